"""ONNX Runtime sessions: CPU everywhere, the CUDA execution provider where a GPU has it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class OrtSession:
    def __init__(self, path: Path | bytes, *, threads: int | None = None, device: str = "auto"):
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
        model = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, inputs)


class OrtRunner:
    """An exported graph with one input and one output, as a backend Runner."""

    backend = "onnxruntime"

    def __init__(
        self,
        model: Path | bytes,
        *,
        threads: int | None = None,
        device: str = "auto",
        precision: str = "fp32",
    ):
        """`model`: the fp32 graph; with `precision="int8"` it is quantized here and run on the
        CPU provider (the dynamic-quantization kernels are CPU ones)."""
        if precision not in ("fp32", "int8"):
            raise ValueError(f"onnxruntime runs fp32 or int8 graphs, not {precision!r}")
        if precision == "int8":
            from tilefm.backends.onnx_export import quantize_int8

            model = quantize_int8(model if isinstance(model, bytes) else Path(model).read_bytes())
            device = "cpu"
        self.precision = precision
        self.session = OrtSession(model, threads=threads, device=device)
        self.input_name = self.session.input_names[0]

    def __call__(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:  # a sequence is stacked
        return self.session(**{self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
