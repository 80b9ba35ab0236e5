"""Stitch benchmark: the mosaic writer and the COG step alone, on random outputs of a card's shape
over the sample scene's tile plan (no reads, no model).

    TILEFM_MODEL_STORE=../shared/models .venv/bin/python bench/stitch.py --model presto --zoom 12 --tiles 60
    TILEFM_MODEL_STORE=../shared/models .venv/bin/python bench/stitch.py --model vit-base --zoom 13 --cog

`add` is what the thread that stitches spends per tile (waiting for the mosaic's compressing
threads included, which bounds it when they are behind); `cpu` is that thread's own CPU time per
tile (what it would cost on a host with cores to spare for the compression); `add+close` adds the
compressing threads' tail, and its `cpu` is every thread's (the mosaic's CPU cost of a tile: with
enough cores, the threads' throughput is their count over it). Outputs come in the model's own
layout: Presto's pixel-interleaved (`--dtype float16`: as a GPU hands them back), the others
bands-first.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit-base")
    ap.add_argument("--zoom", type=int, default=13)
    ap.add_argument("--tiles", type=int, default=0, help="the first N tiles of the plan (0: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cog", action="store_true", help="also time the COG step")
    ap.add_argument(
        "--threads", type=int, default=0, help="compressing threads (0: TILEFM_COG_THREADS's default)"
    )
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="the outputs' dtype")
    ap.add_argument(
        "--store",
        choices=("float16", "float32", "int8"),
        default=None,
        help="how the COG stores embeddings (default: the card's)",
    )
    args = ap.parse_args()

    from tilefm.engine.pipeline import RunSpec, prepare
    from tilefm.engine.stitch import MosaicWriter
    from tilefm.values import Encoding, TileOutput

    spec = RunSpec(
        scene={"s2": str(SCENE)},
        model=args.model,
        zoom=args.zoom,
        out="/tmp/stitch.tif",
        executor="local",
        date=date(2020, 2, 19),
    )
    prep = prepare(spec)
    card, plan = prep.card, prep.plan
    if args.tiles:
        plan = dataclasses.replace(plan, tiles=plan.tiles[: args.tiles])
    C, n = card.output.channels, 256 // card.output_stride
    rng = np.random.default_rng(0)
    pixels_last = card.output_stride == 1 and card.name.startswith("presto")  # per-pixel embeddings

    def values() -> np.ndarray:
        if pixels_last:
            return rng.normal(size=(n, n, C)).astype(args.dtype).transpose(2, 0, 1)
        return rng.normal(size=(C, n, n)).astype(args.dtype)

    outs = [
        TileOutput(tile=t, halo=0, values=values(), weight=np.ones((n, n), np.float32)) for t in plan.tiles
    ]
    enc = Encoding.for_card(card, args.store)
    out_plan = plan.coarsen(card.output_stride.bit_length() - 1)
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            writer = MosaicWriter(
                plan, card, Path(tmp) / "m.tif", enc, halo=0, out_plan=out_plan, threads=args.threads
            )
            c0, p0, f0 = (
                time.thread_time(),
                time.process_time(),
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
            )
            for o in outs:
                writer.add(o)
            t1, c1 = time.perf_counter(), time.thread_time()
            writer.close()
            t2, p2, f2 = (
                time.perf_counter(),
                time.process_time(),
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
            )
            if args.cog:
                writer.finish(Path(tmp) / "c.tif")
            t3 = time.perf_counter()
        ms = 1000 / len(outs)
        print(
            f"{card.name} z{args.zoom}: {len(outs)} tiles ({args.dtype} stored as "
            f"{enc.dtype if enc.dtype == 'int8' else args.store or card.output.dtype}, {writer.threads} "
            f"threads), add {(t1 - t0) * ms:.2f} ms/tile (cpu {(c1 - c0) * ms:.2f}), add+close "
            f"{(t2 - t0) * ms:.2f} ms/tile (all threads' cpu {(p2 - p0) * ms:.2f}, page faults "
            f"{(f2 - f0) / len(outs):.0f}/tile)" + (f", COG step {t3 - t2:.1f} s" if args.cog else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
