"""PyTorch on a CUDA GPU: bf16/fp16 autocast, optional torch.compile, CUDA graphs replayed for
one fixed batch shape (smaller batches are padded to it: a graph per shape would recapture for
every tail batch), pinned host buffers and non-blocking copies on the runner's own stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tilefm.errors import BackendError

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    ):
        if not torch.cuda.is_available():
            raise BackendError("backend 'torch-cuda' needs a CUDA GPU and none is visible to PyTorch")
        if precision not in DTYPES:
            raise BackendError(f"torch-cuda runs fp32, fp16 or bf16, not {precision!r}")
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BackendError("this GPU has no bf16; use TILEFM_PRECISION=fp16")
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.sample_shape = tuple(sample_shape)
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.device = torch.device(device)
        self.module = module.float().eval().to(self.device)
        if compile:
            # inductor's fusions at one static shape; CUDA graphs are ours (below), and no GEMM
            # autotuning (minutes per shape for a ViT-B, for a few per cent)
            self.module = torch.compile(self.module, dynamic=False)
        self.stream = torch.cuda.Stream(self.device)
        self.host_in = torch.zeros((max_batch, *self.sample_shape), dtype=torch.float32, pin_memory=True)
        self.host_out: torch.Tensor | None = None
        self._graph: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.module(x).float()

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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        rows = self.max_batch if self.cuda_graphs else n
        self.host_in[:n].numpy()[...] = x
        if n < rows:
            self.host_in[n:rows].zero_()
        with torch.cuda.stream(self.stream):
            if self.cuda_graphs:
                graph, static_in, out = self._captured()
                static_in.copy_(self.host_in, non_blocking=True)
                graph.replay()
            else:
                out = self._forward(self.host_in[:n].to(self.device, non_blocking=True))
            if self.host_out is None or self.host_out.shape != out.shape:
                self.host_out = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
            self.host_out.copy_(out, non_blocking=True)
        self.stream.synchronize()
        return self.host_out[:n].numpy().copy()
