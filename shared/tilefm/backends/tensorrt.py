"""TensorRT: the model exported to ONNX (dynamic batch), built into an engine for this GPU and
precision with one optimisation profile over the worker's batch sizes, cached in the object
store (backends/engine_cache.py) and run on a CUDA stream with the TensorRT Python API (>= 10).

TensorRT is optional (`pip install 'tilefm[tensorrt]'`); this module imports it only when an
engine is built or run, and says how to get it when it is missing. I/O buffers are torch CUDA
tensors, so no pycuda is needed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from tilefm.backends.base import INSTALL_HINTS, BackendOptions, fill
from tilefm.backends.engine_cache import calibration_digest, engine_key, load_or_build
from tilefm.errors import BackendError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: builder workspace, bytes
WORKSPACE = 4 << 30


def require_tensorrt() -> ModuleType:
    """The tensorrt module, or a BackendError that says how to install it."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendError(f"backend 'tensorrt' is not installed: {INSTALL_HINTS['tensorrt']}")
    import tensorrt as trt

    return trt


def build_engine(
    onnx: bytes,
    *,
    precision: str,
    input_name: str,
    sample_shape: tuple[int, ...],
    batch_sizes: tuple[int, int, int],
) -> bytes:
    """A serialized engine for an ONNX graph with a dynamic batch axis."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse the exported model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":  # a Q/DQ graph (calibration.quantize_qdq): its pairs run int8, the rest fp16
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision != "fp32":
        raise BackendError(f"tilefm builds TensorRT engines in fp32, fp16, bf16 or int8, not {precision!r}")
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch_sizes
    profile.set_shape(input_name, (lo, *sample_shape), (opt, *sample_shape), (hi, *sample_shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BackendError("TensorRT could not build an engine (see its log above)")
    return bytes(engine)


class TensorRTRunner:
    """A deserialized engine, run on its own CUDA stream; host buffers are pinned. The engine's
    float32 outputs are rounded on the GPU when `out_dtype` is float16 (as torch-cuda does)."""

    backend = "tensorrt"

    def __init__(self, engine: bytes, *, precision: str, max_batch: int, out_dtype: str = "float32"):
        import torch

        trt = require_tensorrt()
        self.torch = torch
        self.precision = precision
        self.max_batch = max_batch
        from tilefm.backends.torch_cuda import OUT_DTYPES

        self.out_dtype = OUT_DTYPES[out_dtype]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise BackendError(
                "the cached TensorRT engine cannot be loaded (built by another TensorRT or GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()
        self._host: dict[str, Any] = {}

    def _pinned(self, name: str, shape: tuple[int, ...], dtype: Any = None) -> Any:
        dtype = dtype or self.torch.float32
        buf = self._host.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._host[name] = self.torch.empty(shape, dtype=dtype, pin_memory=True)
        return buf

    def __call__(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        outs = [self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _run(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        torch = self.torch
        shape = (len(x), *x[0].shape)
        host_in = self._pinned("in", shape)
        fill(host_in.numpy(), x)
        with torch.cuda.stream(self.stream):
            dev_in = host_in.to("cuda", non_blocking=True)
            self.context.set_input_shape(self.input, shape)
            out_shape = tuple(self.context.get_tensor_shape(self.output))
            dev_out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input, dev_in.data_ptr())
            self.context.set_tensor_address(self.output, dev_out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError("TensorRT failed to run the batch")
            host_out = self._pinned("out", out_shape, self.out_dtype)
            host_out.copy_(dev_out.to(self.out_dtype), non_blocking=True)
        self.stream.synchronize()
        return host_out.numpy().copy()


def tensorrt_runner(
    module: nn.Module,
    sample_shape: tuple[int, ...],
    options: BackendOptions,
    *,
    model_sha256: str,
    calibration: np.ndarray | None = None,
) -> TensorRTRunner:
    """Load this model's engine from the cache, or export, build and cache it first. int8 needs
    `calibration` (real inputs [N, *sample_shape]); its digest goes into the cache key."""
    if options.precision == "int8" and (calibration is None or len(calibration) == 0):
        raise BackendError(
            "int8 on tensorrt needs a calibration set (tilefm models calibrate)", field="precision"
        )
    trt = require_tensorrt()
    import torch

    from tilefm.backends.onnx_export import INPUT_NAME, export_onnx

    if not torch.cuda.is_available():
        raise BackendError(
            "backend 'tensorrt' needs a CUDA GPU and none is visible to PyTorch; install "
            f"{INSTALL_HINTS['tensorrt']}"
        )
    if not options.engine_cache:
        raise BackendError("set TILEFM_ENGINE_CACHE (a folder or s3:// prefix) for TensorRT engines")
    key = engine_key(
        model_sha256,
        torch.cuda.get_device_capability(),
        trt.__version__,
        options.precision,
        sample_shape,
        options.max_batch,
        calibration_sha256=calibration_digest(calibration) if options.precision == "int8" else "",
    )

    def build() -> bytes:
        onnx = export_onnx(module, sample_shape)
        if options.precision == "int8" and calibration is not None:  # required for int8 (above)
            from tilefm.backends.calibration import quantize_qdq

            onnx = quantize_qdq(onnx, calibration)
        return build_engine(
            onnx,
            precision=options.precision,
            input_name=INPUT_NAME,
            sample_shape=sample_shape,
            batch_sizes=key.batch_sizes,
        )

    engine, _ = load_or_build(options.engine_cache, key, build)
    return TensorRTRunner(
        engine, precision=options.precision, max_batch=options.max_batch, out_dtype=options.out_dtype
    )
