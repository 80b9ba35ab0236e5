"""What every backend shares: the options a worker runs with, the runner protocol, and the
helpers the concrete runners use. The concrete backends import this module, never the package
(`tilefm.backends`), which picks among them: no import circle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

#: how to get each backend, for error messages
INSTALL_HINTS = {
    "torch": "pip install tilefm",
    "torch-cuda": (
        "a CUDA build of PyTorch (pip install torch --index-url https://download.pytorch.org/whl/cu124) on "
        "a machine with an NVIDIA GPU"
    ),
    "onnxruntime": "pip install tilefm (onnxruntime-gpu for its CUDA execution provider)",
    "tensorrt": "pip install 'tilefm[tensorrt]' on a machine with an NVIDIA GPU and a CUDA build of PyTorch",
}


@dataclass(frozen=True)
class BackendOptions:
    """How a worker runs its model (from Settings: TILEFM_PRECISION, TILEFM_MAX_BATCH, ...)."""

    precision: str = "auto"
    #: the largest batch the worker sends: TensorRT's profile and the CUDA graphs' shape
    max_batch: int = 8
    compile: bool = False
    cuda_graphs: bool = True
    #: URI prefix (file or s3) where TensorRT engines are cached
    engine_cache: str | None = None
    threads: int | None = None
    #: name used in cache keys and logs
    model_name: str = "model"
    #: dtype of the outputs handed back: "float16" where the COG stores 16 bits and nothing is
    #: averaged on the host first (a GPU rounds them as the stitcher would, ties to even, and
    #: copies back, and the host converts, half the bytes); "float32" otherwise
    out_dtype: str = "float32"
    extra: dict[str, str] = field(default_factory=dict)


class Runner(Protocol):
    """A model bound to a backend: [N, ...] float32 in (an array, or a sequence of N samples,
    which GPU runners copy straight into their pinned memory instead of stacking them first),
    [N, ...] float32 out (float16 with `BackendOptions.out_dtype`). GPU runners also have
    `launch(x) -> Pending`, which queues the batch and returns at once."""

    backend: str
    precision: str

    def __call__(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray: ...


class Pending(Protocol):
    """A batch a runner has queued: `result()` waits for its outputs."""

    def result(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Done:
    """Outputs already computed, as a `Pending` (runners that compute when called)."""

    outputs: np.ndarray

    def result(self) -> np.ndarray:
        return self.outputs


#: dtypes a runner hands its outputs back in
OUT_DTYPES = ("float32", "float16")


def fill(host: np.ndarray, x: np.ndarray | Sequence[np.ndarray]) -> None:
    """Copy a batch into `host` ([N, ...]): an array at once, a sequence sample by sample (one
    copy, where stacking it first would be two)."""
    if isinstance(x, np.ndarray):
        host[...] = x
    else:
        for j, sample in enumerate(x):
            host[j] = sample
