"""Inference backends behind one interface, chosen per worker.

A backend turns a torch module (the fp32 reference) into a `Runner`: numpy batch in, numpy batch
out. `torch` (CPU, fp32), `torch-cuda` (autocast, CUDA graphs, torch.compile), `onnxruntime`
(CPU, or its CUDA execution provider where present) and `tensorrt` (engines cached in the object
store). `auto` takes the fastest one that is available and that the card lists: tensorrt >
torch-cuda > onnxruntime on CUDA > the card's own order among the CPU ones. Heavy imports happen
only when a backend is used, so a CPU machine never needs TensorRT or CUDA.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from tilefm.backends.base import (
    INSTALL_HINTS,
    OUT_DTYPES,
    BackendOptions,
    Done,
    Pending,
    Runner,
    fill,
)
from tilefm.card import ModelCard
from tilefm.errors import BackendError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "GPU_BACKENDS",
    "INSTALL_HINTS",
    "KNOWN",
    "OUT_DTYPES",
    "BackendOptions",
    "Done",
    "Pending",
    "Runner",
    "fill",
    "make_runner",
    "resolve_precision",
    "select_backend",
]

#: backends tilefm knows, fastest first
KNOWN = ("tensorrt", "torch-cuda", "onnxruntime", "torch")
#: backends that need a GPU (an encoder actor running one reserves a GPU on Ray)
GPU_BACKENDS = ("tensorrt", "torch-cuda")
_MODULES = {"torch": "torch", "torch-cuda": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


@lru_cache
def cuda_available() -> bool:
    """A CUDA device that PyTorch can use (torch-cuda and tensorrt run their I/O through it)."""
    if not is_installed("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


@lru_cache
def ort_cuda_available() -> bool:
    if not is_installed("onnxruntime"):
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def unavailable_reason(name: str) -> str | None:
    """Why `name` cannot run here (with what to install), or None when it can."""
    if name not in KNOWN:
        return f"unknown backend {name!r} (choose auto, {', '.join(KNOWN)})"
    if not is_installed(name):
        return f"backend {name!r} is not installed: {INSTALL_HINTS[name]}"
    if name in ("torch-cuda", "tensorrt") and not cuda_available():
        return (
            f"backend {name!r} needs a CUDA GPU and none is visible to PyTorch; install {INSTALL_HINTS[name]}"
        )
    return None


def runs_precision(backend: str, precision: str) -> bool:
    """Whether `backend` can run `precision` at all (the card decides whether the model may)."""
    if precision in ("auto", "fp32"):
        return True
    if precision == "int8":
        return backend in ("onnxruntime", "tensorrt")
    return backend in GPU_BACKENDS


def _auto_order(card: ModelCard, precision: str = "auto") -> list[str]:
    gpu: list[str] = [n for n in ("tensorrt", "torch-cuda") if n in card.backends]
    if "onnxruntime" in card.backends and ort_cuda_available():
        gpu.append("onnxruntime")
    cpu = [n for n in card.backends if n in ("torch", "onnxruntime") and n not in gpu]
    if precision == "int8":  # TensorRT's int8 needs a calibration set: only when asked for by name
        gpu = [n for n in gpu if n != "tensorrt"]
    return [n for n in gpu + cpu if runs_precision(n, precision)]


def select_backend(
    card: ModelCard, requested: str = "auto", *, remote: bool = False, precision: str = "auto"
) -> str:
    """The backend to run `card` with, or a BackendError that says what to do instead.
    `remote`: the model runs on a Ray cluster elsewhere, whose GPU workers may have what this
    host lacks; a GPU backend the card allows is then left for those workers to check.
    `precision`: `auto` only picks among backends that run it (int8: onnxruntime)."""
    if requested == "auto":
        for name in _auto_order(card, precision):
            if unavailable_reason(name) is None:
                return name
        if precision not in ("auto", "fp32"):
            can = [n for n in card.backends if runs_precision(n, precision)]
            if remote and any(n in GPU_BACKENDS for n in can):
                return "auto"  # the GPU workers pick theirs
            raise BackendError(
                f"no backend installed here runs model {card.name!r} in {precision} "
                f"({'it needs ' + ' or '.join(can) if can else 'none of its backends does'})",
                field="precision",
            )
        raise BackendError(
            f"no backend for model {card.name!r} is installed (it runs on: {', '.join(card.backends)})"
        )
    if requested not in KNOWN:
        raise BackendError(f"unknown backend {requested!r} (choose auto, {', '.join(KNOWN)})")
    if requested not in card.backends:
        raise BackendError(
            f"model {card.name!r} cannot run on {requested!r}; it runs on: {', '.join(card.backends)}"
        )
    reason = unavailable_reason(requested)
    if reason and not (remote and requested in GPU_BACKENDS):
        raise BackendError(reason)
    return requested


def check_precision(card: ModelCard, precision: str) -> None:
    """`auto`, or a precision the card allows (whatever the backend)."""
    if precision != "auto" and precision not in card.precisions:
        raise BackendError(
            f"model {card.name!r} may run in {', '.join(card.precisions)}, not {precision!r}",
            field="precision",
        )


def resolve_precision(card: ModelCard, backend: str, requested: str = "auto") -> str:
    """`auto` is bf16 on GPU backends where the card allows it, else fp16, else fp32; fp32 on
    CPU ones (the reference). int8 (where the card lists it) is ONNX Runtime's dynamic
    quantization on CPUs, or a TensorRT engine from the model's calibration set
    (backends/calibration.py). A precision the card or the backend does not allow is an error."""
    if requested == "auto":
        if backend in GPU_BACKENDS:
            for p in ("bf16", "fp16"):
                if p in card.precisions:
                    return p
        return "fp32"
    check_precision(card, requested)
    if requested == "fp32":
        return requested
    if requested == "int8":
        if backend in ("onnxruntime", "tensorrt"):
            return requested
        raise BackendError(
            "int8 runs on onnxruntime (CPU, dynamic quantization) or tensorrt (calibrated), not on "
            f"{backend!r}",
            field="precision",
        )
    if backend == "onnxruntime":
        raise BackendError(
            f"onnxruntime runs the exported fp32 graph or its int8 quantization, not {requested!r}; use "
            "torch-cuda or tensorrt for fp16/bf16",
            field="precision",
        )
    if backend not in GPU_BACKENDS:
        raise BackendError(
            f"precision {requested!r} needs a GPU backend (torch-cuda or tensorrt); {backend!r} runs fp32 "
            "or int8",
            field="precision",
        )
    return requested


class _Rounded:
    """A CPU runner whose float32 outputs are rounded to float16 (`BackendOptions.out_dtype`):
    the same values a GPU runner hands back rounded on the device, for CPU runs and tests of
    that path. On a CPU nothing is saved, so `auto` options leave CPU runners at float32."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.backend, self.precision = runner.backend, runner.precision

    def __call__(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        import torch

        return torch.from_numpy(self.runner(x)).to(torch.float16).numpy()  # ties to even, as on a GPU


def _rounded(runner: Runner, out_dtype: str) -> Runner:
    return _Rounded(runner) if out_dtype == "float16" else runner


def make_runner(
    module: nn.Module,
    backend: str,
    sample_shape: tuple[int, ...],
    options: BackendOptions,
    *,
    model_sha256: str,
    calibration: np.ndarray | None = None,
) -> Runner:
    """Build `backend`'s runner for a fp32 CPU module taking [N, *sample_shape]. `calibration`:
    real inputs [N, *sample_shape] for a TensorRT int8 engine's scales (backends/calibration.py)."""
    if options.out_dtype not in OUT_DTYPES:
        raise BackendError(f"runners hand back {' or '.join(OUT_DTYPES)} outputs, not {options.out_dtype!r}")
    if backend == "torch":
        from tilefm.backends.torch_cpu import TorchRunner

        return _rounded(TorchRunner(module, threads=options.threads), options.out_dtype)
    if backend == "torch-cuda":
        from tilefm.backends.torch_cuda import TorchCudaRunner

        return TorchCudaRunner(
            module,
            sample_shape,
            precision=options.precision,
            max_batch=options.max_batch,
            compile=options.compile,
            cuda_graphs=options.cuda_graphs,
            out_dtype=options.out_dtype,
        )
    if backend == "onnxruntime":
        from tilefm.backends.onnx_export import export_onnx
        from tilefm.backends.onnxruntime import OrtRunner

        return _rounded(
            OrtRunner(
                export_onnx(module, sample_shape), threads=options.threads, precision=options.precision
            ),
            options.out_dtype,
        )
    if backend == "tensorrt":
        from tilefm.backends.tensorrt import tensorrt_runner

        return tensorrt_runner(
            module, sample_shape, options, model_sha256=model_sha256, calibration=calibration
        )
    raise BackendError(f"unknown backend {backend!r} (choose auto, {', '.join(KNOWN)})")
