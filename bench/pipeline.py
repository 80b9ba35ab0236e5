"""Pipeline benchmark: model-only vs end-to-end tiles/s for a model over the sample scene.

    export TILEFM_MODEL_STORE=../shared/models
    .venv/bin/python bench/pipeline.py [--model ukis-csmask] [--zoom 11] [--rounds 2]

- model-only: the same batches of tiles, inputs already in memory, through the model alone
  (window stacks -> backend -> probabilities; no reads, no blending, no writes). On the scene's
  own grid (`context.grid: native`) that is the distinct windows each batch runs;
- end-to-end: `tilefm run` as a user runs it (scene checks, plan, Ray readers and encoder actor,
  stitching, COG with overviews, STAC item, output written), wall clock.

Rounds alternate the two so that a noisy neighbour hurts both; the ratio is taken per round.
Results are printed as JSON and as a markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tilefm.engine.pipeline import RunSpec, batches, execute, prepare
from tilefm.engine.runtime import WorkerSpec, cpu_count
from tilefm.io.native import read_native
from tilefm.io.read import read_tile
from tilefm.models.onnx import NATIVE_CHUNK

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"


def model_only(prep, batch_size: int) -> tuple[float, int]:
    """Seconds for the model alone over every batch of the plan, inputs prepared beforehand."""
    model = WorkerSpec(card=prep.card, backend=prep.backend, weights=prep.weights).load()
    halo = model.read_halo
    prepared = []
    for batch in batches(prep.plan.tiles, batch_size):
        if prep.card.context.native:  # the distinct windows of the batch on the scene's grid
            stack = model.native_stack(read_native(prep.scene, prep.card, batch))
            prepared += [stack[i : i + NATIVE_CHUNK] for i in range(0, len(stack), NATIVE_CHUNK)]
            continue
        tiles = [read_tile(prep.scene, prep.card, t, halo) for t in batch]
        if hasattr(model, "windows"):
            prepared.append(model.windows(tiles)[0].copy())  # the model reuses its window buffer
        else:  # per-pixel models: the pixel arrays
            parts = [model.pixels(t) for t in tiles]
            prepared.append(tuple(np.concatenate([p[i] for p in parts]) for i in range(3)))
    month = (prep.scene.date.month - 1) if prep.scene.date else 0
    t0 = time.perf_counter()
    for x in prepared:
        if hasattr(model, "predict"):
            model.predict(x)
        else:
            model.embed(*x, month)
    return time.perf_counter() - t0, len(prep.plan.tiles)


def end_to_end(spec: RunSpec) -> tuple[float, int]:
    t0 = time.perf_counter()
    prep = prepare(spec)
    result = execute(prep)
    return time.perf_counter() - t0, result.tiles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ukis-csmask")
    p.add_argument("--zoom", type=int, default=11)
    p.add_argument("--bbox", default=None)
    p.add_argument(
        "--batch-size", type=int, default=None, help="tiles per batch (default: the model's, else 4)"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--executor", default="ray")
    p.add_argument("--scene", default=str(SCENE))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tilefm.grid import parse_bbox

        spec = RunSpec(
            scene={"s2": args.scene},
            model=args.model,
            out=str(Path(tmp) / "out.tif"),
            zoom=args.zoom,
            bbox=parse_bbox(args.bbox) if args.bbox else None,
            batch_size=args.batch_size,
            executor=args.executor,
        )
        prep = prepare(spec)
        if args.batch_size is None:
            from tilefm.engine.pipeline import default_batch

            args.batch_size = default_batch(prep.card)
            spec.batch_size = args.batch_size
        print(
            f"{args.model}: {len(prep.plan.tiles)} tiles at zoom {args.zoom}, batch {args.batch_size}, "
            f"{cpu_count()} CPUs, executor {args.executor}",
            file=sys.stderr,
        )
        end_to_end(spec)  # warm-up: Ray start, imports, file caches
        for r in range(args.rounds):
            e2e_s, tiles = end_to_end(spec)
            mo_s, _ = model_only(prep, args.batch_size)
            row = {
                "round": r,
                "tiles": tiles,
                "model_only_s": round(mo_s, 2),
                "end_to_end_s": round(e2e_s, 2),
                "model_only_tiles_per_s": round(tiles / mo_s, 3),
                "end_to_end_tiles_per_s": round(tiles / e2e_s, 3),
                "ratio": round(mo_s / e2e_s, 3),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    summary = {
        "model": args.model,
        "zoom": args.zoom,
        "tiles": rows[0]["tiles"],
        "batch_size": args.batch_size,
        "executor": args.executor,
        "cpus": cpu_count(),
        "machine": platform.machine(),
        "model_only_tiles_per_s": statistics.median(r["model_only_tiles_per_s"] for r in rows),
        "end_to_end_tiles_per_s": statistics.median(r["end_to_end_tiles_per_s"] for r in rows),
        "ratio": statistics.median(r["ratio"] for r in rows),
        "rounds": rows,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"| {args.model} | {args.zoom} | {summary['tiles']} | {args.batch_size} | "
        f"{summary['model_only_tiles_per_s']:.2f} | "
        f"{summary['end_to_end_tiles_per_s']:.2f} | {summary['ratio']:.2f} |"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
