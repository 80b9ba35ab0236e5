"""PyTorch on a CUDA GPU: bf16/fp16 autocast, optional torch.compile, CUDA graphs replayed for
one fixed batch shape (smaller batches are padded to it: a graph per shape would recapture for
every tail batch), pinned host buffers and non-blocking copies on the runner's own stream, and
two batches in flight (`launch`): while the GPU copies in, runs and copies out one, the host
fills the other's pinned buffer and collects the last one's outputs. With `out_dtype="float16"`
the outputs are rounded on the GPU (ties to even, as the stitcher rounds) before the copy back:
half the bytes over PCIe and through the host's copies, the values the COG stores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tilefm.backends.base import fill
from tilefm.errors import BackendError

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class TorchCudaRunner:
    backend = "torch-cuda"

    def __init__(
        self,
        module: nn.Module,
        sample_shape: tuple[int, ...],
        *,
        precision: str = "bf16",
        max_batch: int = 8,
        compile: bool = False,
        cuda_graphs: bool = True,
        device: str = "cuda",
        out_dtype: str = "float32",
    ):
        if out_dtype not in OUT_DTYPES:
            raise BackendError(f"torch-cuda hands back float32 or float16 outputs, not {out_dtype!r}")
        if not torch.cuda.is_available():
            raise BackendError("backend 'torch-cuda' needs a CUDA GPU and none is visible to PyTorch")
        if precision not in DTYPES:
            raise BackendError(f"torch-cuda runs fp32, fp16 or bf16, not {precision!r}")
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BackendError("this GPU has no bf16; use TILEFM_PRECISION=fp16")
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.out_dtype = OUT_DTYPES[out_dtype]
        self.sample_shape = tuple(sample_shape)
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.device = torch.device(device)
        #: the module, or after `torch.compile` its compiled callable
        self.module: nn.Module | Callable[..., Any] = module.float().eval().to(self.device)
        if compile:
            # inductor's fusions at one static shape; CUDA graphs are ours (below), and no GEMM
            # autotuning (minutes per shape for a ViT-B, for a few per cent)
            self.module = torch.compile(self.module, dynamic=False)
        self.stream = torch.cuda.Stream(self.device)
        # two batches in flight: the host fills one slot while the GPU runs the other's batch
        self.slots = [_Slot(max_batch, self.sample_shape) for _ in range(2)]
        self.turn = 0
        self._graph: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.module(x).to(self.out_dtype)

    def _captured(self) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The CUDA graph for [max_batch, *sample_shape], captured after a warm-up."""
        if self._graph is None:
            static_in = torch.zeros((self.max_batch, *self.sample_shape), device=self.device)
            with torch.cuda.stream(self.stream):
                for _ in range(3):  # warm-up: cuBLAS handles, autotuning, compile
                    self._forward(static_in)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                static_out = self._forward(static_in)
            self._graph = (graph, static_in, static_out)
        return self._graph

    def __call__(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        return self.launch(x).result()

    def launch(self, x: np.ndarray | Sequence[np.ndarray]) -> _Queued:
        """Queue a batch and return once its samples are in pinned memory (`x` may be reused
        then): the caller prepares the next batch while the GPU copies, runs and copies back
        this one. Batches over `max_batch` run chunk by chunk, all but the last waited for."""
        if not len(x):
            raise ValueError("an empty batch")
        step = self.max_batch
        starts = range(0, len(x), step)
        before = [self._queue(x[i : i + step]).result() for i in starts[:-1]]
        last = self._queue(x[starts[-1] :])
        last.before = before
        return last

    @torch.no_grad()
    def _queue(self, x: np.ndarray | Sequence[np.ndarray]) -> _Queued:
        slot = self.slots[self.turn]
        self.turn ^= 1
        if slot.owner is not None:  # its last batch's outputs leave the slot first
            slot.owner.result()
        n = len(x)
        rows = self.max_batch if self.cuda_graphs else n
        fill(slot.host_in[:n].numpy(), x)
        if n < rows:
            slot.host_in[n:rows].zero_()
        # one stream: this batch's copy in waits for the last batch's graph and copy out
        with torch.cuda.stream(self.stream):
            if self.cuda_graphs:
                graph, static_in, out = self._captured()
                static_in.copy_(slot.host_in, non_blocking=True)
                graph.replay()
            else:
                out = self._forward(slot.host_in[:n].to(self.device, non_blocking=True))
            if slot.host_out is None or slot.host_out.shape != out.shape or slot.host_out.dtype != out.dtype:
                slot.host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            slot.host_out.copy_(out, non_blocking=True)
            slot.done.record(self.stream)
        slot.owner = _Queued(slot, n)
        return slot.owner


class _Slot:
    """Pinned host memory for one batch in flight, and the event its outputs' copy records."""

    def __init__(self, max_batch: int, sample_shape: tuple[int, ...]):
        self.host_in = torch.zeros((max_batch, *sample_shape), dtype=torch.float32, pin_memory=True)
        self.host_out: torch.Tensor | None = None
        self.done = torch.cuda.Event()
        #: the queued batch whose outputs are still in `host_out`
        self.owner: _Queued | None = None


class _Queued:
    """A batch on the runner's stream (`TorchCudaRunner.launch`)."""

    def __init__(self, slot: _Slot, n: int):
        self.slot, self.n = slot, n
        self.before: list[np.ndarray] = []
        self.outputs: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self.outputs is None:
            self.slot.done.synchronize()
            if self.slot.host_out is None:
                raise RuntimeError("self.slot.host_out is not set")
            out = self.slot.host_out[: self.n].numpy().copy()
            if self.slot.owner is self:
                self.slot.owner = None
            self.outputs = np.concatenate([*self.before, out]) if self.before else out
        return self.outputs


def batch_for_memory(
    free_bytes: int, per_sample_bytes: int, fixed_bytes: int = 0, *, fraction: float = 0.5, cap: int = 64
) -> int:
    """The largest power-of-two batch (1..`cap`) whose activations, `per_sample_bytes` each plus
    `fixed_bytes` of workspace, fit in `fraction` of the free device memory. A power of two, so
    that a CUDA graph or TensorRT profile sized by it also suits the other replicas' GPUs."""
    budget = free_bytes * fraction - fixed_bytes
    n = 1
    while n * 2 <= cap and (n * 2) * max(per_sample_bytes, 1) <= budget:
        n *= 2
    return n


@torch.no_grad()
def probe_batch(
    module: nn.Module, sample_shape: tuple[int, ...], *, precision: str, cap: int = 64, device: str = "cuda"
) -> int:
    """The batch `module` can run on this GPU at `precision`: the peak memory of batches of 1
    and 2 gives the per-sample and fixed parts, then `batch_for_memory` on the free memory."""
    dev = torch.device(device)
    home = next(module.parameters()).device
    module = module.float().eval().to(dev)
    dtype = DTYPES[precision]
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        x = torch.zeros((n, *sample_shape), device=dev)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            module(x)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        del x
    module.to(home)  # the probe leaves the module where it found it (the runner moves it itself)
    torch.cuda.empty_cache()
    per_sample = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_sample, 0)
    free, _total = torch.cuda.mem_get_info(dev)
    return batch_for_memory(free, per_sample, fixed, cap=cap)
