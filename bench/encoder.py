"""Encoder benchmark: tiles/s per model, backend and batch size, model-only and end-to-end on the
same run, with GPU utilisation where there is a GPU.

    TILEFM_MODEL_STORE=../shared/models .venv/bin/python bench/encoder.py            # CPU, small
    TILEFM_MODEL_STORE=../shared/models .venv/bin/python bench/encoder.py --gpu \\
        --models vit-small,vit-base,presto --batch-sizes 1,8,32 --bbox all --out docs/bench-encoder-h100.md

Both measure the same tile plan (`--zoom`, `--bbox`).
- model-only: the plan's tiles read once beforehand; timed batches through the model alone
  (ViT: normalised stacks -> runner -> per-patch embeddings; Presto: pixel arrays -> encoder),
  after one warm-up batch (export, engine build/load, CUDA graph capture are not counted);
- end-to-end: `tilefm run` with the local executor (reads, encode, stitch, COG, STAC), wall clock
  including the model load.
GPU utilisation is the mean of NVML samples (pynvml / nvidia-ml-py) every 50 ms while a
measurement runs; "n/a" without NVML. Results: a markdown table (stdout and --out) and JSON.
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


class GpuSampler:
    """Mean GPU utilisation (%) while in the `with` block, from NVML; None without it."""

    def __init__(self, index: int = 0, every: float = 0.05):
        self.every, self.samples, self.handle = every, [], None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - no NVML, no GPU: utilisation is simply not measured
            pass

    def __enter__(self) -> "GpuSampler":
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


def settings_env(batch: int, precision: str) -> None:
    """Backends read their options from Settings: one batch size = one CUDA graph / profile."""
    from tilefm.settings import get_settings

    os.environ["TILEFM_MAX_BATCH"] = str(batch)
    os.environ["TILEFM_PRECISION"] = precision
    get_settings.cache_clear()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_only(prep: Any, backend: str, batch: int) -> tuple[float, int, float | None]:
    """(seconds, tiles, GPU %) for the model alone over the plan's tiles, after a warm-up batch."""
    from tilefm.pipeline import batches
    from tilefm.read import read_tile
    from tilefm.runtime import WorkerSpec

    model = WorkerSpec(card=prep.card, backend=backend, weights=prep.weights).load()
    tiles = [read_tile(prep.scene, prep.card, t, model.read_halo) for t in prep.plan.tiles]
    month = (prep.scene.date.month - 1) if prep.scene.date else 0
    work = []
    for group in batches(tiles, batch):
        if prep.card.architecture == "vit":
            parts = [model.inputs(t) for t in group]
            bands = parts[0][0]
            work.append((bands, np.stack([p[1] for p in parts if p[0] == bands])))
        else:
            parts = [model.pixels(t) for t in group]
            work.append(tuple(np.concatenate([p[i] for p in parts]) for i in range(3)))

    def run(item: tuple) -> None:
        if prep.card.architecture == "vit":
            model.embed(*item)
        else:
            model.embed(item[0], item[1], item[2], month)

    run(work[0])  # warm-up: export / engine / graph capture / autotuning
    sync()
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for item in work:
            run(item)
        sync()
        seconds = time.perf_counter() - t0
    return seconds, len(tiles), gpu.mean


def end_to_end(spec_kw: dict[str, Any], backend: str, batch: int) -> tuple[float, int, float | None]:
    from tilefm.pipeline import RunSpec, execute, prepare

    with tempfile.TemporaryDirectory() as tmp, GpuSampler() as gpu:
        spec = RunSpec(**spec_kw, out=str(Path(tmp) / "out.tif"), backend=backend, batch_size=batch, executor="local")
        t0 = time.perf_counter()
        result = execute(prepare(spec))
        seconds = time.perf_counter() - t0
    return seconds, result.tiles, gpu.mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit-small,presto")
    ap.add_argument("--backends", default="", help="comma list; default: every available backend the card lists")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--bbox", default=BBOX, help="minlon,minlat,maxlon,maxlat, or all")
    ap.add_argument("--zoom", type=int, default=10)
    ap.add_argument("--precision", default="auto", help="GPU backends: auto, fp32, fp16, bf16")
    ap.add_argument("--gpu", action="store_true", help="include torch-cuda / tensorrt (needs CUDA)")
    ap.add_argument("--no-e2e", action="store_true", help="model-only numbers only")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args()

    from tilefm.backends import select_backend, unavailable_reason
    from tilefm.models import get_card
    from tilefm.pipeline import RunSpec, prepare

    rows = []
    for name in args.models.split(","):
        card = get_card(name)
        wanted = args.backends.split(",") if args.backends else list(card.backends)
        for backend in wanted:
            if backend not in card.backends or unavailable_reason(backend):
                continue
            if backend in ("torch-cuda", "tensorrt") and not args.gpu:
                continue
            for batch in map(int, args.batch_sizes.split(",")):
                settings_env(batch, args.precision if backend in ("torch-cuda", "tensorrt") else "fp32")
                from tilefm.backends import resolve_precision

                precision = resolve_precision(card, backend, os.environ["TILEFM_PRECISION"])
                bbox = None if args.bbox == "all" else tuple(map(float, args.bbox.split(",")))
                spec_kw = dict(scene={"s2": str(SCENE)}, model=name, zoom=args.zoom, bbox=bbox)
                prep = prepare(RunSpec(**spec_kw, out="/tmp/unused.tif", backend=select_backend(card, backend)))
                s, n, util = model_only(prep, backend, batch)
                row = {"model": name, "backend": backend, "precision": precision, "batch": batch, "tiles": n,
                       "model_tiles_s": n / s, "model_gpu_util": util}  # fmt: skip
                if not args.no_e2e:
                    s2, n2, util2 = end_to_end(spec_kw, backend, batch)
                    row |= {"e2e_tiles": n2, "e2e_tiles_s": n2 / s2, "e2e_gpu_util": util2}
                rows.append(row)
                print(json.dumps(row), flush=True)

    def f(v: Any, fmt: str = "{:.2f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{len(os.sched_getaffinity(0))} ({platform.processor() or platform.machine()})"
    lines = [
        f"Encoder benchmark on {device}, zoom {args.zoom}, sample scene {SCENE.name}; bbox {args.bbox}; model-only after a warm-up batch; end-to-end = `tilefm run --executor local` on the same plan, model load included.",
        "",
        "| model | backend | precision | batch | model-only tiles/s | GPU % | end-to-end tiles/s (tiles) | GPU % |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        e2e = f"{f(r.get('e2e_tiles_s'))} ({r.get('e2e_tiles', '-')})" if "e2e_tiles_s" in r else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | {f(r['model_tiles_s'])} | {f(r['model_gpu_util'], '{:.0f}')} | {e2e} | {f(r.get('e2e_gpu_util'), '{:.0f}')} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
