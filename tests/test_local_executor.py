"""The local executor's threads: readers prepare, one device thread runs the model, the caller
stitches. Outputs in plan order and equal to encoding in one thread; a failed read reaches the
caller as itself; a caller that stops early leaves no thread behind."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_vit import tiny_card
from tilefm.grid import plan_tiles
from tilefm.pipeline import batches
from tilefm.read import read_tiles
from tilefm.runtime import LocalExecutor, WorkerSpec
from tilefm.scene import open_scene

BBOX = (-11.5, 24.7, -11.3, 24.85)


class Recording:
    """A real model that notes which thread ran `prepare` and `run`."""

    def __init__(self, model):
        self.model, self.card, self.read_halo = model, model.card, model.read_halo
        self.backend = model.backend
        self.threads: dict[str, set[str]] = {"prepare": set(), "run": set()}

    def batch_size(self):
        return None

    def prepare(self, tiles):
        self.threads["prepare"].add(threading.current_thread().name)
        return self.model.prepare(tiles)

    def run(self, prepared):
        self.threads["run"].add(threading.current_thread().name)
        return self.model.run(prepared)


def executor(readers: int = 2) -> LocalExecutor:
    ex = LocalExecutor(WorkerSpec(card=tiny_card(), backend="torch", weights=None), readers=readers, prefetch=1)
    ex.model = Recording(ex.model)  # type: ignore[assignment]
    return ex


@pytest.fixture(scope="module")
def plan(scene_dir: Path):
    scene = open_scene({"s2": str(scene_dir)})
    return scene, plan_tiles(scene.footprint, 11, bbox=BBOX).tiles


def test_outputs_in_plan_order_equal_one_thread(plan) -> None:
    scene, tiles = plan
    assert len(tiles) >= 4
    ex = executor()
    got = [o for b in ex.map(scene, batches(tiles, 1)) for o in b]
    assert [o.tile for o in got] == tiles
    ref = ex.model.model.encode(read_tiles(scene, ex.model.card, tiles, 0))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a.weight, b.weight)
    caller = threading.current_thread().name
    assert ex.model.threads["run"] == {"tilefm-device"}
    assert all(n.startswith("tilefm-read") for n in ex.model.threads["prepare"])
    assert caller not in ex.model.threads["run"] | ex.model.threads["prepare"]


def test_a_failed_read_reaches_the_caller(plan, tmp_path: Path, scene_dir: Path) -> None:
    """A band file that turns unreadable after the scene was opened: the read's own error."""
    folder = tmp_path / "scene"
    shutil.copytree(scene_dir, folder)
    scene = open_scene({"s2": str(folder)})
    (folder / "B04.tif").write_bytes(b"not a tiff")
    tiles = plan[1]
    with pytest.raises(Exception) as err:
        for _ in executor().map(scene, batches(tiles, 1)):
            pass
    assert "B04.tif" in str(err.value)
    assert not [t for t in threading.enumerate() if t.name == "tilefm-device"]


def test_a_caller_that_stops_early_leaves_no_thread(plan) -> None:
    scene, tiles = plan
    it = executor(readers=1).map(scene, batches(tiles, 1))
    first = next(it)
    assert first[0].tile == tiles[0]
    it.close()  # as when the stitcher fails: the device thread stops, the readers are cancelled
    deadline = time.monotonic() + 30
    while [t for t in threading.enumerate() if t.name in ("tilefm-device",) or t.name.startswith("tilefm-read")]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
