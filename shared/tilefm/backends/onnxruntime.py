"""ONNX Runtime sessions: CPU everywhere, the CUDA execution provider where a GPU has it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class OrtSession:
    def __init__(self, path: Path, *, threads: int | None = None, device: str = "auto"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle intra-op threads sleep instead of spinning, leaving the cores to the tile readers
        # that run beside the model
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, inputs)
