"""Tile reads: tiles/s of tilefm's sampler (`--warp auto`) against GDAL's warper (`gdal`) on the
same tiles, rounds alternating, and with 1..N reader threads in one process.

    .venv/bin/python bench/reads.py                          # the three cards' read shapes
    .venv/bin/python bench/reads.py --cases vit-small:13 --threads 1,2,4 --rounds 3
    # glibc's own thresholds
    .venv/bin/python bench/reads.py --cases vit-base:14 --batch 32 --threads 1 --prepare --malloc default
    # tilefm's sampler only (to profile)
    .venv/bin/python bench/reads.py --cases vit-base:14 --threads 1 --prepare --warps auto

A case is MODEL:ZOOM: that card's bands and halo over the sample scene's tiles at that zoom,
read in batches of `--batch` tiles (rows of neighbours as strips, as the pipeline reads them).
A thread's share of the tiles is the plan's tiles split into contiguous batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"


def run(scene, card, tiles, batch: int, threads: int, warp: str, prepare: bool = False) -> float:
    """tiles/s reading `tiles` in batches on `threads` threads (`prepare`: and preparing the
    model's input, all that a reader does)."""
    from tilefm.engine.readers import read_prepared
    from tilefm.io.read import read_tiles
    from tilefm.models.base import input_preparer

    halo = card.context.halo
    batches = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
    prep = input_preparer(card)

    def one(b: list) -> object:
        return (
            read_prepared(scene, card, b, halo, prep, warp)
            if prepare
            else read_tiles(scene, card, b, halo, warp)
        )

    t0 = time.perf_counter()
    if threads == 1:  # in this thread, as in a reader process (malloc's main arena, see --malloc)
        for b in batches:
            one(b)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(one, batches):
                pass
    return len(tiles) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="vit-small:13,ukis-csmask:11,presto:12")
    ap.add_argument(
        "--tiles", type=int, default=104, help="tiles per measurement (from the middle of the plan)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--prepare",
        action="store_true",
        help="time the model's input preparation too (a reader's whole work)",
    )
    ap.add_argument(
        "--malloc",
        choices=("retain", "default"),
        default="retain",
        help=(
            "retain: freed arrays stay in the heap, as in tilefm's reader processes "
            "(tilefm.engine.memory; it is the main thread's heap that gave memory back); default: "
            "glibc's own thresholds"
        ),
    )
    ap.add_argument(
        "--warps",
        default="auto,gdal",
        help="samplers to time: auto (tilefm's), gdal (GDAL's warper, ~15x slower), comma separated",
    )
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from tilefm.engine.memory import retain_freed_memory

    if args.malloc == "retain":
        retain_freed_memory()

    from tilefm.grid import plan_tiles
    from tilefm.io.read import card_band_names, read_tiles
    from tilefm.io.scene import open_scene
    from tilefm.models import get_card

    torch.set_num_threads(1)  # one core per reader thread: the numbers are per core
    scene = open_scene({"s2": str(SCENE)})
    rows = []
    for case in args.cases.split(","):
        model, zoom = case.split(":")
        card = get_card(model)
        plan = plan_tiles(scene.footprint, int(zoom)).tiles
        start = max(0, len(plan) // 2 - args.tiles // 2)
        tiles = plan[start : start + args.tiles]
        read_tiles(scene, card, tiles[:2], card.context.halo, "auto")  # imports, first opens
        for threads in map(int, args.threads.split(",")):
            warps = args.warps.split(",")
            got: dict[str, list[float]] = {w: [] for w in warps}
            for _ in range(args.rounds):
                for warp in warps:
                    got[warp].append(run(scene, card, tiles, args.batch, threads, warp, args.prepare))
            row = {
                "case": case,
                "bands": len(card_band_names(card)),
                "bands_read": sum(
                    b.name in scene.modalities[i.modality].bands
                    for i in card.inputs
                    if i.modality in scene.modalities
                    for b in i.bands
                ),
                "halo": card.context.halo,
                "tiles": len(tiles),
                "batch": args.batch,
                "threads": threads,
                "malloc": args.malloc,
                "prepare": args.prepare,
                **{f"{w}_tiles_s": statistics.median(got[w]) for w in warps},
                "rounds": got,
                "cpus": len(os.sched_getaffinity(0)),
            }
            row["speedup"] = (
                row["auto_tiles_s"] / row["gdal_tiles_s"] if {"auto", "gdal"} <= set(warps) else None
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json_out:
                with args.json_out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print("\n| case | bands read | halo | threads | tilefm tiles/s | GDAL tiles/s | x |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [r.get("auto_tiles_s"), r.get("gdal_tiles_s"), r["speedup"]]
        print(
            f"| {r['case']} | {r['bands_read']} | {r['halo']} | {r['threads']} | "
            + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
