"""The local executor: readers (threads, or processes handing batches over in shared memory)
prepare, one device thread runs the model, the caller stitches. Outputs in plan order and equal to
encoding in one thread, for either kind of reader; a failed read reaches the caller as itself; a
caller that stops early leaves no thread, process or shared-memory file behind."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLOUDS_BBOX
from test_vit import tiny_card

from tilefm.engine.pipeline import batches
from tilefm.engine.readers import ProcessReaders
from tilefm.engine.runtime import LocalExecutor, WorkerSpec
from tilefm.grid import plan_tiles
from tilefm.io import read as read_module
from tilefm.io.read import read_tiles
from tilefm.io.scene import open_scene

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

    def launch(self, prepared):
        self.threads["run"].add(threading.current_thread().name)
        return self.model.launch(prepared)


def executor(readers: int = 2, kind: str = "thread") -> LocalExecutor:
    worker = WorkerSpec(card=tiny_card(), backend="torch", weights=None)
    return LocalExecutor(worker, readers=readers, prefetch=1, kind=kind, model=Recording(worker.load()))  # type: ignore[arg-type]  # a stand-in


def slot_files(ex: LocalExecutor) -> list[str]:
    folder, stem = os.path.split(ex.reads.prefix)
    return [n for n in os.listdir(folder) if n.startswith(stem)]


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
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a.weight, b.weight)
    caller = threading.current_thread().name
    assert ex.model.threads["run"] == {"tilefm-device"}
    assert ex.model.threads["prepare"] and all(
        n.startswith("tilefm-read") for n in ex.model.threads["prepare"]
    )
    assert caller not in ex.model.threads["run"] | ex.model.threads["prepare"]


def test_a_reader_threads_files_close_from_any_thread(plan) -> None:
    """A reader thread's open files are closed by whichever thread lets them go: the garbage
    collector, once the thread's cache goes (rasterio >= 1.5 closes datasets then), or a cache
    cleared elsewhere. Closing must not need the opening thread's GDAL environment."""
    scene, tiles = plan
    card = executor().model.card
    opened: list = []

    def read() -> None:
        read_tiles(scene, card, tiles[:2], 0)
        opened.extend(read_module._cache.readers.values())

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert opened
    for reader in opened:
        reader.close()
    assert all(r.dataset.closed for r in opened)


@pytest.fixture(scope="module")
def chip(scene_dir: Path):
    """4 x 3 tiles of the scene at zoom 11 in batches of 1 and 3 tiles (each slot is used several times, and
    grows when a larger batch first comes to it), with the model's outputs read in one thread."""
    scene = open_scene({"s2": str(scene_dir)})
    tiles = plan_tiles(scene.footprint, 11, bbox=CLOUDS_BBOX).tiles
    assert len(tiles) == 12
    sizes, chunks, i = [1, 3], [], 0
    while i < len(tiles):
        chunks.append(tiles[i : i + sizes[len(chunks) % 2]])
        i += len(chunks[-1])
    ex = executor()
    ref = ex.model.model.encode(read_tiles(scene, ex.model.card, tiles, 0))
    return scene, tiles, chunks, ref


def test_reader_processes_give_what_one_thread_does(chip) -> None:
    scene, tiles, chunks, ref = chip
    ex = executor(kind="process")
    assert isinstance(ex.reads, ProcessReaders) and len(ex.reads.free) == 2 + 1 + 1
    try:
        for _ in range(2):  # the processes and their slots serve run after run
            got = [o for b in ex.map(scene, chunks) for o in b]
            assert [o.tile for o in got] == tiles
            for a, b in zip(got, ref, strict=True):
                np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-5)
                np.testing.assert_array_equal(a.weight, b.weight)
        # the batches came through the slots, and the model ran them here, not in the readers
        assert ex.reads.maps and len(slot_files(ex)) == len(ex.reads.maps) <= 4
        assert ex.model.threads["run"] == {"tilefm-device"} and not ex.model.threads["prepare"]
    finally:
        ex.close()
    assert slot_files(ex) == []


def test_reader_processes_without_shared_memory_send_batches_whole(chip, caplog) -> None:
    """No room for a slot (here: its folder is missing): the batches come back through the pipe,
    and the user is told once why that is slower."""
    scene, tiles, chunks, ref = chip
    ex = executor(kind="process")
    ex.reads.prefix = "/nonexistent/tilefm-slot"
    try:
        got = [o for b in ex.map(scene, chunks[:6]) for o in b]
    finally:
        ex.close()
    assert not ex.reads.maps and [o.tile for o in got] == tiles[: sum(map(len, chunks[:6]))]
    warned = [r.getMessage() for r in caplog.records if "no room" in r.getMessage()]
    assert len(warned) == 1 and "/nonexistent" in warned[0] and "shm-size" in warned[0]
    for a, b in zip(got, ref[: len(got)], strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_failed_read_reaches_the_caller(plan, tmp_path: Path, scene_dir: Path, kind: str) -> None:
    """A band file that turns unreadable after the scene was opened: the read's own error."""
    folder = tmp_path / "scene"
    shutil.copytree(scene_dir, folder)
    scene = open_scene({"s2": str(folder)})
    (folder / "B04.tif").write_bytes(b"not a tiff")
    tiles = plan[1]
    ex = executor(kind=kind)
    try:
        with pytest.raises(Exception) as err:
            for _ in ex.map(scene, batches(tiles, 1)):
                pass
        assert "B04.tif" in str(err.value)
        assert not [t for t in threading.enumerate() if t.name == "tilefm-device"]
        if kind == "process":  # every slot is free again, and the readers still read
            assert len(ex.reads.free) == 4
            good = open_scene({"s2": str(scene_dir)})
            assert [o.tile for b in ex.map(good, batches(tiles, 1)) for o in b] == tiles
    finally:
        ex.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_caller_that_stops_early_leaves_nothing_behind(plan, kind: str) -> None:
    scene, tiles = plan
    ex = executor(readers=1, kind=kind)
    it = ex.map(scene, batches(tiles, 1))
    first = next(it)
    assert first[0].tile == tiles[0]
    it.close()  # as when the stitcher fails: the device thread stops, the readers are cancelled
    deadline = time.monotonic() + 30
    while [
        t for t in threading.enumerate() if t.name in ("tilefm-device",) or t.name.startswith("tilefm-read")
    ]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if kind == "process":
        assert len(ex.reads.free) == 3  # what was still being read gave its slot back
        pids = list(ex.reads.pool._processes)
        assert pids and slot_files(ex)
        ex.close()
        assert slot_files(ex) == []
        for pid in pids:  # the reader processes have exited
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.mark.integration
def test_a_run_with_reader_processes_writes_the_same_cog(
    tmp_path: Path, scene_dir: Path, model_store: Path
) -> None:
    """`tilefm run --executor local` with reader processes (as on a GPU host) and with threads:
    the same classes, pixel for pixel, and no shared-memory file left behind."""
    import rasterio
    from conftest import run_cli

    from tilefm.engine.readers import shm_dir

    before = {n for n in os.listdir(shm_dir()) if n.startswith("tilefm-")}
    arrays = {}
    for kind in ("process", "thread"):
        out = tmp_path / f"{kind}.tif"
        r = run_cli(
            "run",
            "--scene",
            f"s2={scene_dir}",
            "--model",
            "ukis-csmask",
            "--zoom",
            "11",
            "--executor",
            "local",
            "--batch-size",
            "1",
            "--bbox",
            ",".join(map(str, BBOX)),
            "--out",
            f"file://{out}",
            env={
                "TILEFM_LOCAL_READER_KIND": kind,
                "TILEFM_LOCAL_READERS": "2",
                "TILEFM_MODEL_STORE": str(model_store),
            },
        )
        assert r.returncode == 0, r.stderr
        assert (
            f"in batches of 1 on onnxruntime (fp32), 2 reader {kind}{'es' if kind == 'process' else 's'},"
            in r.stderr
        )
        with rasterio.open(out) as ds:
            arrays[kind] = ds.read()
    assert arrays["process"].shape == arrays["thread"].shape and (arrays["thread"] > 0).any()
    np.testing.assert_array_equal(arrays["process"], arrays["thread"])
    assert {n for n in os.listdir(shm_dir()) if n.startswith("tilefm-")} <= before


@pytest.mark.integration
def test_reader_processes_from_a_script_without_a_main_guard(tmp_path: Path, scene_dir: Path) -> None:
    """A user's script that calls tilefm at module level: the readers must not run it again."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_local_executor import BBOX, executor\n"
        "from tilefm.grid import plan_tiles\n"
        "from tilefm.engine.pipeline import batches\n"
        "from tilefm.io.scene import open_scene\n"
        f"scene = open_scene({{'s2': {str(scene_dir)!r}}})\n"
        "tiles = plan_tiles(scene.footprint, 11, bbox=BBOX).tiles\n"
        "ex = executor(kind='process')\n"
        "print('encoded', sum(len(b) for b in ex.map(scene, batches(tiles, 1))), 'of', len(tiles), "
        "flush=True)\n"
        "ex.close()\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Exception ignored" not in r.stderr, r.stderr[-3000:]
    lines = r.stdout.split()
    assert r.stdout.count("encoded") == 1 and lines[1] == lines[3], r.stdout


class Queueing(Recording):
    """A model whose `launch` returns before the batch is finished (as on a GPU): the device
    thread must queue the next batch before it finishes this one."""

    def __init__(self, model):
        super().__init__(model)
        self.events: list[str] = []

    def launch(self, prepared):
        k = sum(e.startswith("launch") for e in self.events)
        self.events.append(f"launch {k}")
        outputs = self.model.run(prepared)

        def finish():
            self.events.append(f"finish {k}")
            return outputs

        return finish


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_device_thread_queues_a_batch_before_finishing_the_last(plan, kind: str) -> None:
    scene, tiles = plan
    worker = WorkerSpec(card=tiny_card(), backend="torch", weights=None)
    model = Queueing(worker.load())
    ex = LocalExecutor(worker, readers=2, prefetch=1, kind=kind, model=model)  # type: ignore[arg-type]  # a stand-in
    try:
        got = [o for b in ex.map(scene, batches(tiles, 1)) for o in b]
    finally:
        ex.close()
    assert [o.tile for o in got] == tiles
    n = len(tiles)
    assert model.events == ["launch 0"] + [
        e for k in range(1, n) for e in (f"launch {k}", f"finish {k - 1}")
    ] + [f"finish {n - 1}"]
    ref = model.model.encode(read_tiles(scene, model.card, tiles, 0))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-5)


def test_readers_and_cog_threads_follow_where_the_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local run on a GPU host gives most cores to readers (processes) and the stitcher (the
    12 readers and 6 COG threads on 16 cores; 4 readers left an H200 waiting); on a
    CPU the model needs the cores: up to 4 of each. A count set by hand wins."""
    from tilefm.engine import runtime
    from tilefm.engine.runtime import local_threads

    assert local_threads(True, 16) == (12, 6)
    assert local_threads(False, 16) == (4, 4)
    assert local_threads(True, 2) == (1, 2) and local_threads(False, 1) == (1, 1)
    assert local_threads(True, 128) == (16, 8)  # shared memory per reader: capped
    worker = WorkerSpec(card=tiny_card(), backend="torch", weights=None)
    model = worker.load()
    monkeypatch.setattr(runtime, "cpu_count", lambda: 16)
    ex = LocalExecutor(worker, kind="thread", model=model)
    assert not ex.on_gpu and ex.readers == 4
    ex.close()
    monkeypatch.setattr(type(model), "on_gpu", property(lambda self: True))  # what cannot run here: a GPU
    ex = LocalExecutor(worker, kind="thread", model=model)
    assert ex.on_gpu and ex.readers == 12
    ex.close()
    ex = LocalExecutor(worker, readers=3, kind="thread", model=model)
    assert ex.readers == 3
    ex.close()
