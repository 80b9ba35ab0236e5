"""A reader's freed arrays stay in its heap (`tilefm.engine.memory`): measured as page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

#: tilefm in processes of their own
pytestmark = pytest.mark.integration

# a fresh process per measurement: mallopt's thresholds are process-wide and cannot be undone
SCRIPT = """
import json, resource, sys
import torch
torch.set_num_threads(1)
from tilefm.grid import plan_tiles
from tilefm.engine.memory import retain_freed_memory
from tilefm.models import get_card
from tilefm.engine.readers import read_prepared
from tilefm.io.scene import open_scene
# twice: idempotent
retained = retain_freed_memory() and retain_freed_memory() if sys.argv[2] == "1" else False
scene, card = open_scene({"s2": sys.argv[1]}), get_card("vit-base")
plan = plan_tiles(scene.footprint, 14).tiles
tiles = plan[len(plan) // 2 : len(plan) // 2 + 160]
for i in range(0, 64, 32):  # imports, first opens, the heap's growth to a batch's peak
    read_prepared(scene, card, tiles[i : i + 32], card.context.halo)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(64, len(tiles), 32):
    read_prepared(scene, card, tiles[i : i + 32], card.context.halo)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": faults}))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")


def faults(scene_dir: Path, retain: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(scene_dir), "1" if retain else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_a_reader_reuses_its_freed_arrays(scene_dir: Path) -> None:
    """Three batches of 32 ViT tiles after two: with the thresholds raised, a small fraction of the page
    faults (measured: ~700 a tile before, a few dozen after)."""
    plain, kept = faults(scene_dir, False), faults(scene_dir, True)
    assert kept["retained"] and not plain["retained"]
    assert kept["faults"] * 4 < plain["faults"], (kept, plain)
