"""Encoder benchmark: tiles/s per model, backend, variant and batch size, model-only and
end-to-end on the same run, GPU utilisation, and each variant's error against torch fp32 on CPU.

    TILEFM_MODEL_STORE=../shared/models .venv/bin/python bench/encoder.py            # CPU, small
    TILEFM_MODEL_STORE=../shared/models python bench/encoder.py --gpu --models vit-base,vit-small,presto \\
        --batch-sizes 8,32,64 --bbox all --zoom 13 --presto-pixels 120560400 --json-out out.json

What is measured (all on the same tile plan, `--zoom` / `--bbox`):
- model-only: the plan's tiles read once beforehand, then cycled until `--min-tiles` tiles have
  gone through the model alone (ViT: normalised stacks -> runner -> per-patch embeddings;
  Presto: pixel arrays -> encoder), after a warm-up (export, compile, CUDA graph capture are
  not counted). Host<->device copies are included. The ViT's batches are queued one ahead
  (`launch_embed`: the next batch goes into pinned memory while the GPU runs this one), as the
  pipeline runs them; `model_sync_tiles_s` is the same with each batch waited for.
- error: the variant's output on the first real batch against the torch fp32 CPU reference,
  max |a - b| / max |b| (limits in tilefm.backends.compare: fp32 1e-4, fp16/bf16 2e-2, int8
  5e-2), and the share of pixels keeping their class in a k-means (k=8) class map of the
  reference embeddings.
- end-to-end: `tilefm run --executor local|ray` on the same plan (readers, encode, stitch, COG),
  wall clock without the model load (timed from the first batch handed to the readers).
- Presto on `--presto-pixels` pixels (10980^2 = one 10 m Sentinel-2 tile): the scene's real
  pixels cycled through the encoder, wall clock with the GPU synchronised.
GPU utilisation is the mean of NVML samples every 50 ms during a measurement ("n/a" without NVML).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"
#: a small part of the scene (2 tiles at zoom 10); `--bbox all` for the whole scene
BBOX = "-11.5,24.7,-11.3,24.85"

#: how a backend runs: precision, torch.compile, CUDA graphs
VARIANTS = {
    "int8": dict(precision="int8", compile=False, graphs=False),
    "fp32-eager": dict(precision="fp32", compile=False, graphs=False),
    "fp32-graphs": dict(precision="fp32", compile=False, graphs=True),
    "bf16-graphs": dict(precision="bf16", compile=False, graphs=True),
    "fp16-graphs": dict(precision="fp16", compile=False, graphs=True),
    "bf16-compile": dict(precision="bf16", compile=True, graphs=True),
    "fp32": dict(precision="fp32", compile=False, graphs=False),
    "bf16": dict(precision="bf16", compile=False, graphs=False),
    "fp16": dict(precision="fp16", compile=False, graphs=False),
}
#: default variants per (architecture, GPU backend)
GPU_VARIANTS = {
    "vit": ["fp32-eager", "bf16-graphs", "fp16-graphs", "bf16-compile"],
    "presto": ["fp32", "bf16", "fp16"],
}
#: variants per CPU backend (those the card does not allow are skipped)
CPU_VARIANTS = {"onnxruntime": ["fp32", "int8"], "torch": ["fp32"]}


class GpuSampler:
    """Mean GPU utilisation (%) while in the `with` block, from NVML; None without it."""

    def __init__(self, index: int = 0, every: float = 0.05):
        self.every, self.samples, self.handle = every, [], None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001, S110 - no NVML, no GPU: utilisation is simply not measured
            pass

    def __enter__(self) -> GpuSampler:
        self._stop = threading.Event()
        if self.handle is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def settings_env(batch: int, variant: dict[str, Any]) -> None:
    """Backends read their options from Settings: one batch size = one CUDA graph / profile."""
    from tilefm.settings import get_settings

    os.environ["TILEFM_MAX_BATCH"] = str(batch)
    os.environ["TILEFM_PRECISION"] = variant["precision"]
    os.environ["TILEFM_TORCH_COMPILE"] = "true" if variant["compile"] else "false"
    os.environ["TILEFM_CUDA_GRAPHS"] = "true" if variant["graphs"] else "false"
    get_settings.cache_clear()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Workload:
    """The plan's tiles, read once, as the model's inputs (per batch size)."""

    def __init__(self, prep: Any, model: Any):
        from concurrent.futures import ThreadPoolExecutor

        from tilefm.io.read import read_tile

        self.prep, self.vit = prep, prep.card.architecture == "vit"
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            tiles = list(
                pool.map(lambda t: read_tile(prep.scene, prep.card, t, model.read_halo), prep.plan.tiles)
            )
        self.month = (prep.scene.date.month - 1) if prep.scene.date else 0
        if self.vit:
            parts = [model.inputs(t) for t in tiles]
            self.bands = parts[0][0]
            self.x = np.stack([p[1] for p in parts if p[0] == self.bands])
        else:
            parts = [model.pixels(t) for t in tiles]
            self.pix = [p[:3] for p in parts]
        self.tiles = len(tiles)

    def items(self, batch: int, min_tiles: int) -> list[tuple]:
        """Batches of the plan's tiles, cycled up to `min_tiles` tiles."""
        n = self.x.shape[0] if self.vit else len(self.pix)
        order = [i % n for i in range(max(min_tiles, n))]
        out = []
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            if self.vit:
                out.append((len(idx), self.x[idx]))
            else:
                out.append((len(idx), *(np.concatenate([self.pix[i][k] for i in idx]) for k in range(3))))
        return out

    def run(self, model: Any, item: tuple) -> np.ndarray:
        if self.vit:
            return model.embed(self.bands, item[1])
        return model.embed(item[1], item[2], item[3], self.month)


def model_only(
    work: Workload, model: Any, batch: int, min_tiles: int, reference: np.ndarray | None
) -> dict[str, Any]:
    items = work.items(batch, min_tiles)
    first = work.run(model, items[0])  # warm-up: export / engine / compile / graph capture
    work.run(model, items[0])
    sync()
    from tilefm.backends.compare import agreement

    m = min(len(first), len(reference)) if reference is not None else 0
    agree = agreement(first[:m], reference[:m]) if reference is not None else None
    tiles = sum(i[0] for i in items)
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for item in items:
            work.run(model, item)
        sync()
        seconds = time.perf_counter() - t0
    row: dict[str, Any] = {}
    if work.vit:  # each batch queued before the last one's outputs are taken, as the pipeline runs it
        sync_s = seconds
        with GpuSampler() as gpu:
            t0 = time.perf_counter()
            last = None
            for item in items:
                queued = model.launch_embed(work.bands, item[1])
                if last is not None:
                    last.result()
                last = queued
            last.result()
            sync()
            seconds = time.perf_counter() - t0
        row["model_sync_tiles_s"] = tiles / sync_s
    return {
        **row,
        "tiles": tiles,
        "model_tiles_s": tiles / seconds,
        "model_gpu_util": gpu.mean,
        "rel_err": agree.rel_error if agree else None,
        "class_agreement": agree.class_agreement if agree else None,
    }


def end_to_end(
    spec_kw: dict[str, Any], backend: str, batch: int, executor: str = "local", precision: str | None = None
) -> dict[str, Any]:
    from tilefm.engine.pipeline import RunSpec, execute, prepare

    with tempfile.TemporaryDirectory() as tmp, GpuSampler() as gpu:
        spec = RunSpec(
            **spec_kw,
            out=str(Path(tmp) / "out.tif"),
            backend=backend,
            precision=precision,
            batch_size=batch,
            executor=executor,
        )
        result = execute(prepare(spec))
    t = result.timings
    # model load happens before the first batch; the rest is the pipeline as a user meets it
    seconds = t["total_s"] - t.get("load_s", 0.0)
    # the stream (read + encode + stitch) alone, before the COG step: what keeping the GPU fed means
    return {
        "e2e_tiles": result.tiles,
        "e2e_tiles_s": result.tiles / seconds,
        "e2e_stream_tiles_s": result.tiles / t["tiles_s"],
        "e2e_gpu_util": gpu.mean,
        "e2e_readers": result.readers,
        "e2e_timings": {k: round(v, 2) for k, v in t.items()},
    }


def end_to_end_rounds(rounds: int, *args: Any) -> dict[str, Any]:
    """`end_to_end` `rounds` times in this process. The row keeps the first (what a fresh worker
    gives) and adds every round's tiles/s: a process's first job touches fresh memory, which on
    a VM costs more the first time (docs/benchmarks.md, "Stitcher and COG")."""
    first = end_to_end(*args)
    runs = [first] + [end_to_end(*args) for _ in range(rounds - 1)]
    if rounds > 1:
        first["e2e_rounds_tiles_s"] = [round(r["e2e_tiles_s"], 1) for r in runs]
        first["e2e_rounds_stream_tiles_s"] = [round(r["e2e_stream_tiles_s"], 1) for r in runs]
    return first


def presto_pixels(work: Workload, model: Any, pixels: int) -> dict[str, Any]:
    """Seconds for `pixels` of Presto on the model's device: the scene's pixels cycled."""
    raw, present, ll = (np.concatenate([p[k] for p in work.pix]) for k in range(3))
    step = min(len(raw), 1 << 22)
    raw, present, ll = raw[:step], present[:step], ll[:step]
    model.embed(raw[:65536], present[:65536], ll[:65536], work.month)  # warm-up
    sync()
    done = 0
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        while done < pixels:
            n = min(step, pixels - done)
            model.embed(raw[:n], present[:n], ll[:n], work.month)
            done += n
        sync()
        seconds = time.perf_counter() - t0
    return {"pixels": done, "seconds": seconds, "pixels_s": done / seconds, "gpu_util": gpu.mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit-small,presto")
    ap.add_argument(
        "--backends", default="", help="comma list; default: every available backend the card lists"
    )
    ap.add_argument(
        "--variants",
        default="",
        help=f"GPU variants (default per architecture: {GPU_VARIANTS}); of {', '.join(VARIANTS)}",
    )
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--bbox", default=BBOX, help="minlon,minlat,maxlon,maxlat, or all")
    ap.add_argument("--zoom", type=int, default=10)
    ap.add_argument(
        "--min-tiles", type=int, default=0, help="model-only: cycle the plan's tiles up to this many"
    )
    ap.add_argument("--gpu", action="store_true", help="include torch-cuda / tensorrt (needs CUDA)")
    ap.add_argument(
        "--e2e",
        default="best",
        choices=["best", "all", "none"],
        help="end-to-end runs: the fastest model-only variant per model and backend, every row, or none",
    )
    ap.add_argument(
        "--e2e-rounds",
        type=int,
        default=1,
        help=(
            "end-to-end runs per row, in this process (the first is the row's; every round's tiles/s are "
            "listed)"
        ),
    )
    ap.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help=(
            "end-to-end: reader threads in this process, or Ray reader tasks (processes) and an encoder actor"
        ),
    )
    ap.add_argument(
        "--presto-pixels",
        type=int,
        default=0,
        help="also time Presto over this many pixels (10980^2 = 120560400)",
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--json-out", type=Path, default=None, help="append each row as JSON here")
    args = ap.parse_args()

    from tilefm.backends import unavailable_reason
    from tilefm.engine.pipeline import RunSpec, prepare
    from tilefm.engine.runtime import WorkerSpec
    from tilefm.models import get_card

    bbox = None if args.bbox == "all" else tuple(map(float, args.bbox.split(",")))
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json_out:
            with args.json_out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    for name in args.models.split(","):
        card = get_card(name)
        spec_kw = dict(scene={"s2": str(SCENE)}, model=name, zoom=args.zoom, bbox=bbox)
        prep = prepare(RunSpec(**spec_kw, out="/tmp/unused.tif", backend="torch"))
        settings_env(8, VARIANTS["fp32"])
        ref_model = WorkerSpec(card=card, backend="torch", weights=prep.weights).load()
        work = Workload(prep, ref_model)
        reference = work.run(ref_model, work.items(8, 0)[0])
        wanted = args.backends.split(",") if args.backends else list(card.backends)
        for backend in wanted:
            if backend not in card.backends or unavailable_reason(backend):
                continue
            gpu = backend in ("torch-cuda", "tensorrt")
            if gpu and not args.gpu:
                continue
            variants = (
                (args.variants.split(",") if args.variants else GPU_VARIANTS[card.architecture])
                if gpu
                else CPU_VARIANTS[backend]
            )
            best: tuple[float, dict[str, Any]] | None = None
            for vname in variants:
                v = VARIANTS[vname]
                if v["precision"] not in card.precisions:
                    continue
                for batch in map(int, args.batch_sizes.split(",")):
                    settings_env(batch, v)
                    model = WorkerSpec(card=card, backend=backend, weights=prep.weights).load()
                    row = {
                        "model": name,
                        "backend": backend,
                        "variant": vname,
                        "precision": v["precision"],
                        "batch": batch,
                        **model_only(work, model, batch, args.min_tiles, reference),
                    }
                    if args.e2e == "all":
                        row |= end_to_end_rounds(
                            args.e2e_rounds, spec_kw, backend, batch, args.executor, v["precision"]
                        )
                        row["ratio"] = row["e2e_tiles_s"] / row["model_tiles_s"]
                    emit(row)
                    if best is None or row["model_tiles_s"] > best[0]:
                        best = (row["model_tiles_s"], row)
                    del model
                    if (
                        card.architecture == "presto"
                        and args.presto_pixels
                        and batch == int(args.batch_sizes.split(",")[0])
                    ):
                        settings_env(batch, v)
                        m = WorkerSpec(card=card, backend=backend, weights=prep.weights).load()
                        emit(
                            {
                                "model": name,
                                "backend": backend,
                                "variant": vname,
                                "presto": presto_pixels(work, m, args.presto_pixels),
                            }
                        )
            if args.e2e == "best" and best is not None:
                b = best[1]
                settings_env(b["batch"], VARIANTS[b["variant"]])
                e2e = end_to_end_rounds(
                    args.e2e_rounds, spec_kw, backend, b["batch"], args.executor, b["precision"]
                )
                emit({**b, **e2e, "ratio": e2e["e2e_tiles_s"] / b["model_tiles_s"]})

    def f(v: Any, fmt: str = "{:.1f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    import torch

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU x{len(os.sched_getaffinity(0))} ({platform.processor() or platform.machine()})"
    )
    lines = [
        f"Encoder benchmark on {device}, zoom {args.zoom}, sample scene {SCENE.name}, bbox {args.bbox}.",
        "",
        "| model | backend | variant | batch | model-only tiles/s | GPU % | error vs fp32 CPU | classes "
        "kept | end-to-end tiles/s (tiles, readers) | stream tiles/s | GPU % | e2e / model |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "presto" in r:
            p = r["presto"]
            lines.append(
                f"| {r['model']} | {r['backend']} | {r['variant']} | {p['pixels']:,} px | "
                f"{p['seconds']:.1f} s ({p['pixels_s'] / 1e6:.1f} Mpx/s) | {f(p['gpu_util'], '{:.0f}')} | | "
                "| | | | |"
            )
            continue
        e2e = (
            f"{f(r.get('e2e_tiles_s'))} ({r.get('e2e_tiles', '-')}, {r.get('e2e_readers', '-')})"
            if "e2e_tiles_s" in r
            else "-"
        )
        ratio = f(r.get("ratio"), "{:.2f}") if "ratio" in r else "-"
        synced = f" (each waited for: {f(r['model_sync_tiles_s'])})" if "model_sync_tiles_s" in r else ""
        cells = [
            r["model"],
            r["backend"],
            r["variant"],
            r["batch"],
            f(r["model_tiles_s"]) + synced,
            f(r["model_gpu_util"], "{:.0f}"),
            f(r["rel_err"], "{:.1e}"),
            f(r.get("class_agreement"), "{:.2%}"),
            e2e,
            f(r.get("e2e_stream_tiles_s")),
            f(r.get("e2e_gpu_util"), "{:.0f}"),
            ratio,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for r in rows:
        if "e2e_rounds_tiles_s" in r:
            per = ", ".join(map(str, r["e2e_rounds_tiles_s"]))
            stream = ", ".join(map(str, r["e2e_rounds_stream_tiles_s"]))
            ratios = ", ".join(f"{t / r['model_tiles_s']:.2f}" for t in r["e2e_rounds_tiles_s"])
            lines.append(
                f"\n{r['model']} {r['variant']} batch {r['batch']}, end to end by round in one process: "
                f"{per} tiles/s (stream {stream}); e2e / model {ratios}"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
