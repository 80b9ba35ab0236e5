"""The reference backend: the torch module itself, fp32 on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class TorchRunner:
    backend = "torch"
    precision = "fp32"

    def __init__(self, module: nn.Module, *, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.module = module.float().eval()

    def __call__(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:  # a sequence is stacked
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
