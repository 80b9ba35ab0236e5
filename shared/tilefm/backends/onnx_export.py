"""Torch modules to ONNX with a dynamic batch axis (what onnxruntime and TensorRT run), and the
int8 graph ONNX Runtime runs on CPUs."""

from __future__ import annotations

import io
import logging
import warnings

import torch
from torch import nn

from tilefm.errors import BackendError

#: ONNX opset: 17 has LayerNormalization (one fused op for TensorRT) and is read by TensorRT >= 8.6
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "x", "y"


def export_onnx(module: nn.Module, sample_shape: tuple[int, ...], *, batch: int = 2) -> bytes:
    """The ONNX graph of `module` (fp32, eval) for inputs [N, *sample_shape], N dynamic.

    Uses the TorchScript exporter (`dynamo=False`): it needs only the `onnx` package, and its
    graphs of plain conv/attention/LayerNorm parse in TensorRT as they are.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it; say so plainly if it is missing)
    except ImportError:
        raise BackendError("exporting to ONNX needs the onnx package: pip install onnx") from None
    module = module.float().eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            (torch.zeros((batch, *sample_shape)),),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter (dynamo=False) writes file objects too
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


#: ops whose weights int8 quantization rounds: the trunk's matrix products. The patch embedding
#: (a Conv whose kernels come from the band wavelengths) stays fp32: it is a small share of the
#: time and the sensor-specific part of the model.
INT8_OPS = ("MatMul", "Gemm")


def quiet_ort_advice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Please consider")  # ONNX Runtime's advice to pre-process


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """The graph with dynamic int8 quantization: weights rounded per output channel ahead of
    time, activations quantized per batch as they come (no calibration set needed, so every
    worker makes the same graph). Runs on ONNX Runtime's CPU provider (VNNI/AVX2 kernels)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tilefm-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        root = logging.getLogger()
        root.addFilter(quiet_ort_advice)  # it logs "Please consider to run pre-processing" on the root logger
        try:
            quantize_dynamic(
                src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=list(INT8_OPS)
            )
        finally:
            root.removeFilter(quiet_ort_advice)
        return dst.read_bytes()
