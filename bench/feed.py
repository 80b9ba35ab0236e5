"""Feed benchmark: how many tiles/s the host side of a run can hand a GPU, with the model itself
replaced by an instant one (what an infinitely fast device would leave as the bottleneck).

    export TILEFM_MODEL_STORE=../shared/models
    .venv/bin/python bench/feed.py --model vit-base --zoom 13 --readers 1,2
    .venv/bin/python bench/feed.py --zoom 14 --readers 2 --kinds process --store s3

Everything else is the real pipeline of `tilefm run --executor local`: reader threads (or
processes, `--kinds process`) read the tiles (tilefm's sampler or GDAL) and prepare the model's
input (`TileModel.prepare`: normalising, band sets, stacking), the main thread hands batches to
the model and stitches the outputs (the mosaic writer's threads compress finished blocks), then
the COG step and the upload (`--store`: a local file, or a throwaway SeaweedFS on 127.0.0.1).
The stand-in network returns outputs of its shape (random values by default, `--values
zeros`), so the numbers say nothing about the model.
`--device-ms` makes it wait that long per tile without the GIL, as a thread waiting on a GPU
does: the stream's rate against 1000/device-ms tiles/s is then the end-to-end / model-only
ratio such a GPU would see, with the host's reading and stitching overlapping the device. Feed
tiles/s >= a device's model-only tiles/s means that device would not wait for the host; divide
by the readers to get a per-core rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilefm.backends import Done

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"


class InstantModel:
    """The real model (its `prepare`, and its `run` around the network: e.g. Presto's unpacking of
    per-pixel embeddings into tiles, which a GPU host pays on the device thread) with the network
    itself replaced by an instant one: `embed` returns the network's output shape and dtype
    (Presto: per-pixel float16, as from a GPU; the ViT: per-patch float32), copied from a pool of
    values as a GPU's results are copied out of pinned memory. `out_dtype`: what the outputs
    come in ("gpu": what a GPU runner hands back for this model and the card's storage)."""

    def __init__(self, model: Any, device_ms: float = 0.0, values: str = "random", out_dtype: str = "gpu"):
        from dataclasses import replace

        from tilefm.models.vit_tiles import half_outputs

        self.model, self.card, self.read_halo = model, model.card, model.read_halo
        self.device_s = device_ms / 1000
        self.backend, self.precision = "instant", "-"
        self.prepare = model.prepare
        C, rng = self.card.output.channels, np.random.default_rng(0)
        if out_dtype == "gpu":
            half = (
                half_outputs(self.card, "torch-cuda")
                if self.card.output_stride > 1
                else self.card.output.dtype == "float16"
            )
            out_dtype = "float16" if half else "float32"
        self.dtype = np.dtype(out_dtype)
        if self.card.output_stride > 1:  # embed(bands, x) -> [N, C, n, n]
            n = 256 // self.card.output_stride
            self.unit, self.per_tile = (C, n, n), 1
            model.options = replace(model.options, out_dtype=out_dtype)  # tiles with no data: the same dtype
        else:  # embed(raw, present, latlons, month) -> [pixels, C]
            self.unit, self.per_tile = (C,), 256 * 256
        pool_shape = (4 if self.per_tile == 1 else 256 * 256, *self.unit)
        self.pool = (
            np.zeros(pool_shape, self.dtype)
            if values == "zeros"
            else rng.normal(size=pool_shape).astype(self.dtype)
        )
        model.embed = self.embed
        model.launch_embed = lambda *args: Done(self.embed(*args))  # the ViT's queued embed, computed now

    def embed(self, first: Any, *rest: Any) -> np.ndarray:
        rows = len(rest[0]) if self.per_tile == 1 else len(first)  # the ViT's stack, or Presto's pixels
        if self.device_s:  # a GPU computing: the feeding thread waits without the GIL, as in a CUDA sync
            time.sleep(self.device_s * rows / self.per_tile)
        out = np.empty((rows, *self.unit), self.dtype)
        p = len(self.pool)
        for s in range(0, rows, p):
            out[s : s + p] = self.pool[: min(p, rows - s)]
        return out

    def batch_size(self) -> None:
        return None

    def run(self, prepared: Any) -> list:
        return self.model.run(prepared)

    def launch(self, prepared: Any) -> Any:
        return self.model.launch(prepared)


def feed(
    prep: Any,
    readers: int,
    batch: int,
    cog: bool,
    device_ms: float = 0.0,
    values: str = "random",
    kind: str = "thread",
    out_root: str | None = None,
    out_dtype: str = "gpu",
) -> dict[str, Any]:
    """One run; `out_root`: the folder URI the COG goes to (None: a local temporary folder)."""
    from tilefm.engine.pipeline import batches, publish
    from tilefm.engine.runtime import LocalExecutor, WorkerSpec
    from tilefm.settings import get_settings
    from tilefm.values import Encoding

    worker = WorkerSpec(card=prep.card, backend=prep.backend, weights=prep.weights)
    ex = LocalExecutor(
        worker,
        readers=readers,
        prefetch=2,
        kind=kind,
        model=InstantModel(worker.load(), device_ms, values, out_dtype),
    )  # type: ignore[arg-type]  # a stand-in for the model
    settings = get_settings()
    timings: dict[str, float] = {}
    n = len(prep.plan.tiles)
    # reader processes start with the executor (as while a real model loads): not timed
    list(ex.map(prep.scene, batches(prep.plan.tiles[:readers], 1)))
    main_cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outputs = (o for b in ex.map(prep.scene, batches(prep.plan.tiles, batch)) for o in b)
        if cog:
            out = (
                f"{out_root}/feed-{os.getpid()}-{time.time_ns()}.tif"
                if out_root
                else str(Path(tmp) / "out.tif")
            )
            publish(prep, Encoding.for_card(prep.card), outputs, out, settings, timings=timings)
        else:
            done = sum(1 for _ in outputs)
            assert done == n
            timings["tiles_s"] = time.perf_counter() - t0
        total = time.perf_counter() - t0
    main_cpu = time.process_time() - main_cpu
    ex.close()
    return {
        "kind": kind,
        "readers": readers,
        "batch": batch,
        "tiles": n,
        "feed_tiles_s": n / timings["tiles_s"],
        "main_cpu_ms_per_tile": round(1000 * main_cpu / n, 2),
        "stream_s": round(timings["tiles_s"], 2),
        "cog_s": round(timings.get("cog_s", 0.0), 2),
        "upload_s": round(timings.get("upload_s", 0.0), 2),
        "total_s": round(total, 2),
        "store": "s3" if out_root else "file",
        "stitched": cog,
        "device_ms": device_ms,
        "values": values,
        "out_dtype": out_dtype,
        "vs_device": (n * device_ms / 1000) / timings["tiles_s"] if device_ms else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit-base")
    ap.add_argument("--zoom", type=int, default=13)
    ap.add_argument("--bbox", default="all", help="minlon,minlat,maxlon,maxlat, or all")
    ap.add_argument("--readers", default="1,2", help="reader thread counts, comma separated")
    ap.add_argument(
        "--kinds", default="thread", help="reader kinds to compare (thread, process), comma separated"
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--rounds", type=int, default=2, help="rounds per reader count (alternating); the best is reported"
    )
    ap.add_argument(
        "--no-stitch", action="store_true", help="count outputs instead of stitching them and making the COG"
    )
    ap.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help=(
            "stand-in device time per tile (a sleep, GIL released): the stream's tiles/s against "
            "1000/device-ms"
        ),
    )
    ap.add_argument(
        "--values",
        choices=("random", "zeros"),
        default="random",
        help="what the stand-in network returns: random normal values (compress as badly as any), or zeros",
    )
    ap.add_argument(
        "--out-dtype",
        choices=("gpu", "float32", "float16"),
        default="gpu",
        help=(
            "the stand-in's outputs: what a GPU runner hands back for the model (the ViTs: float16), or as "
            "given"
        ),
    )
    ap.add_argument(
        "--store",
        choices=("file", "s3"),
        default="file",
        help="where the COG goes: a local file, or a throwaway SeaweedFS on 127.0.0.1 (tilefm.localstack)",
    )
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        out_root = None
        if args.store == "s3":
            from tilefm.localstack import S3Server
            from tilefm.settings import get_settings

            s3 = stack.enter_context(S3Server())
            os.environ.update(s3.tilefm_env())
            get_settings.cache_clear()
            out_root = f"s3://{s3.bucket}/feed"
        run(args, out_root)


def run(args: argparse.Namespace, out_root: str | None) -> None:

    from tilefm.engine.pipeline import RunSpec, prepare
    from tilefm.grid import parse_bbox

    spec = RunSpec(
        scene={"s2": str(SCENE)},
        model=args.model,
        zoom=args.zoom,
        out="/tmp/feed.tif",
        bbox=None if args.bbox == "all" else parse_bbox(args.bbox),
        executor="local",
        date=None,
    )
    prep = prepare(spec)
    readers = [int(r) for r in args.readers.split(",")]
    kinds = args.kinds.split(",")
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {(k, r): [] for r in readers for k in kinds}
    for _ in range(args.rounds):
        for k, r in rows:
            rows[k, r].append(
                feed(
                    prep,
                    r,
                    args.batch,
                    not args.no_stitch,
                    args.device_ms,
                    args.values,
                    k,
                    out_root,
                    args.out_dtype,
                )
            )
    cpus = len(os.sched_getaffinity(0))
    print(
        f"{args.model} z{args.zoom}: {len(prep.plan.tiles)} tiles, batch {args.batch}, {cpus} CPUs, "
        f"warp={os.environ.get('TILEFM_WARP', 'auto')}"
    )
    print(f"the COG to: {out_root or 'a local file'}; outputs: {args.out_dtype}")
    print(
        "| readers | feed tiles/s (best of rounds) | per reader | rounds | stream s | COG s | upload s | "
        "stream / device-only | main process CPU ms/tile |"
    )
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for (k, r), rs in rows.items():
        best = max(rs, key=lambda x: x["feed_tiles_s"])
        each = ", ".join(f"{x['feed_tiles_s']:.1f}" for x in rs)
        print(
            f"| {r} ({k}) | {best['feed_tiles_s']:.1f} | {best['feed_tiles_s'] / r:.1f} | {each} | "
            f"{best['stream_s']} | {best['cog_s']} | {best['upload_s']} | {best['vs_device'] or 0:.2f} | "
            f"{best['main_cpu_ms_per_tile']} |"
        )
        if args.json_out:
            with args.json_out.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "model": args.model,
                            "zoom": args.zoom,
                            "cpus": cpus,
                            **best,
                            "rounds": [x["feed_tiles_s"] for x in rs],
                        }
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
