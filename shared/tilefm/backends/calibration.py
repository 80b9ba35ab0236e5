"""Calibration sets for int8 engines: real tiles, prepared as the model sees them, and the
quantized graph TensorRT builds its int8 engine from.

TensorRT's int8 needs a static scale for every activation it quantizes; the scales come from running
the model on representative inputs. tilefm keeps those inputs as a file per model in the model store
(`tilefm models calibrate` reads them from a real scene, tilefm.models.calibrate), so that every
worker makes the same graph, and the engine cache key (model, GPU, TensorRT, precision, shapes) gets
the calibration's digest too. The graph is ONNX with explicit QuantizeLinear/DequantizeLinear pairs
(ONNX Runtime's static quantization, symmetric int8 as TensorRT requires, weights per output
channel, the same matrix products as the CPU's dynamic int8): TensorRT runs those layers in int8 and
the rest in fp16. ONNX Runtime runs the same graph on a CPU, which is how its error is checked where
there is no GPU.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilefm.card import ModelCard
from tilefm.errors import BackendError

log = logging.getLogger(__name__)

#: samples per calibration batch
BATCH = 4


@dataclass(frozen=True)
class Calibration:
    """Normalised model inputs of real tiles, [N, len(present), 256, 256]: the tiles of a scene
    where every band its modalities give has data (the band set its engine is built for)."""

    x: np.ndarray  # float16
    present: tuple[int, ...]  # the card bands (indices) in x, in input order
    bands: tuple[str, ...]  # all the card's band names ("modality:band"), to tell cards apart
    weights: str  # the checkpoint (weights_id) the set was made for: its activations depend on it
    source: str  # where the tiles came from (JSON)

    def for_bands(self, bands: tuple[int, ...]) -> np.ndarray | None:
        """The inputs of the network bound to a band set (indices into the card's bands), or
        None when the set does not hold them all."""
        where = {b: i for i, b in enumerate(self.present)}
        if not all(b in where for b in bands):
            return None
        return self.x[:, [where[b] for b in bands]].astype(np.float32)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            x=self.x,
            present=np.array(self.present),
            bands=np.array(self.bands),
            weights=self.weights,
            source=self.source,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        with np.load(path) as z:
            return cls(
                z["x"],
                tuple(int(b) for b in z["present"]),
                tuple(str(b) for b in z["bands"]),
                str(z["weights"]),
                str(z["source"]),
            )


def weights_id(card: ModelCard) -> str:
    """The checkpoint's sha256, or the seed of a card without one."""
    return card.weights.sha256 or f"seed:{card.weights.seed}"


def card_bands(card: ModelCard) -> tuple[str, ...]:
    return tuple(f"{i.modality}:{b.name}" for i in card.inputs for b in i.bands)


def calibration_path(card: ModelCard, store: Path, modalities: list[str]) -> Path:
    """One set per combination of modalities: `<store>/<model>/calibration-<s1+s2>.npz`."""
    return Path(store) / card.name / f"calibration-{'+'.join(sorted(set(modalities)))}.npz"


def require_calibration(card: ModelCard, store: Path, bands: tuple[int, ...]) -> np.ndarray:
    """Calibration inputs for the network bound to `bands`, from a set in the model store that
    holds them, or a BackendError that says how to make one."""
    hint = (
        f"run `tilefm models calibrate {card.name} --scene MODALITY=SOURCE` on a representative scene with "
        "these bands"
    )
    names = card_bands(card)
    folder = Path(store) / card.name
    for path in sorted(folder.glob("calibration-*.npz")):
        cal = Calibration.load(path)
        if cal.weights != weights_id(card) or cal.bands != names:
            log.warning("%s was made for other weights or bands of %s: not used", path, card.name)
            continue
        x = cal.for_bands(bands)
        if x is not None:
            return x
    raise BackendError(
        f"int8 on tensorrt needs a calibration set for {card.name!r} with bands "
        f"{', '.join(names[b] for b in bands)} in {folder}; {hint}",
        field="precision",
    )


def quantize_qdq(onnx_bytes: bytes, samples: np.ndarray) -> bytes:
    """The fp32 graph with static int8 QuantizeLinear/DequantizeLinear pairs on the trunk's matrix
    products: activation ranges from `samples` (min/max), symmetric int8 (zero points 0, as
    TensorRT's explicit quantization takes them), weights per output channel."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from tilefm.backends.onnx_export import INPUT_NAME, INT8_OPS, quiet_ort_advice

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(
                [
                    {INPUT_NAME: samples[i : i + BATCH].astype(np.float32)}
                    for i in range(0, len(samples), BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="tilefm-qdq-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        src.write_bytes(onnx_bytes)
        root = logging.getLogger()
        root.addFilter(quiet_ort_advice)
        try:
            quantize_static(
                src,
                dst,
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(INT8_OPS),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        finally:
            root.removeFilter(quiet_ort_advice)
        return dst.read_bytes()
