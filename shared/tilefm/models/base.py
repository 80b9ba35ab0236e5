"""What an encoder worker holds: a model bound to a backend, turning tile inputs into tile outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tilefm.card import ModelCard
from tilefm.errors import ModelError
from tilefm.io.read import TileInput
from tilefm.models.architectures import architecture, resolve
from tilefm.values import TileOutput


class TileModel(ABC):
    """A model ready to run on tiles with one backend."""

    def __init__(self, card: ModelCard, backend: str):
        self.card = card
        self.backend = backend
        self.preparer = input_preparer(card)

    #: what the backend computes in (GPU backends: fp16 / bf16 where the card allows)
    precision: str = "fp32"

    @property
    def on_gpu(self) -> bool:
        """Whether the model computes on a GPU (an actor holding one while it does not wastes it)."""
        from tilefm.backends import GPU_BACKENDS, ort_cuda_available

        return self.backend in GPU_BACKENDS or (
            self.backend == "onnxruntime" and self.precision != "int8" and ort_cuda_available()
        )

    def batch_size(self) -> int | None:
        """Tiles per batch this model's device takes at once (a GPU's from its memory), or None
        for no preference (the run's own batch size is used)."""
        return None

    @property
    def read_halo(self) -> int:
        """Pixels read around each tile (at least the card's halo; more if a derived input needs it)."""
        return self.card.context.halo

    def warm(  # noqa: B027 - optional: most models build nothing
        self, modalities: Iterable[str], bands: Mapping[str, float | None] | None = None
    ) -> None:
        """Build what the first batch would (ONNX export, int8 quantization, TensorRT engine,
        torch.compile, CUDA graphs) for a scene of these modalities (`bands`, where given: the
        card bands the scene has and the centre wavelengths its sensor states for them,
        `read.scene_bands`), so that it is paid at load and not by the stream of tiles. Models
        with nothing to build do nothing."""

    def encode(self, tiles: list[TileInput]) -> list[TileOutput]:
        """Run the model on a batch of tiles."""
        return self.run(self.prepare(tiles))

    def prepare(self, tiles: list[TileInput]) -> Any:
        """The host-side part of `encode` that needs no model (normalising, stacking): run by
        the reader threads or tasks (`input_preparer`), so that what feeds the device only feeds
        it."""
        return self.preparer(tiles)

    @abstractmethod
    def run(self, prepared: Any) -> list[TileOutput]:
        """The model on a prepared batch (what `prepare` returned)."""

    def launch(self, prepared: Any) -> Callable[[], list[TileOutput]]:
        """Start `run` and return what finishes it: models on a GPU queue the batch (the device
        thread then prepares the next one while the GPU runs this one); by default it runs now.
        Nothing the finishing call reads may be `prepared`'s memory, which a reader process's
        slot reuses once this returns."""
        outputs = self.run(prepared)
        return lambda: outputs


class InputPreparer:
    """A model's input preparation without the model: small and picklable, built from the card
    alone, so that a Ray reader task hands the encoder actor its input ready to run."""

    def __init__(self, card: ModelCard):
        self.card = card

    def __call__(self, tiles: list[TileInput]) -> Any:
        return tiles


def input_preparer(card: ModelCard) -> InputPreparer:
    """The card's input preparation (its architecture's, `tilefm.models.architectures`)."""
    path = architecture(card.architecture).inputs
    cls = resolve(path) if path else InputPreparer
    preparer: InputPreparer = cls(card)
    return preparer


def normalize(card: ModelCard, data: np.ndarray) -> np.ndarray:
    """(raw * scale + shift - mean) / std per band, in the card's band order."""
    a, c = normalize_coefficients(card)
    return data * a + c


def normalize_coefficients(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """`normalize` as data * a + c: a and c per band, [bands, 1, 1] float32."""
    bands = [b for i in card.inputs for b in i.bands]
    a = np.array([b.scale / b.std for b in bands], np.float32)[:, None, None]
    c = np.array([(b.shift - b.mean) / b.std for b in bands], np.float32)[:, None, None]
    return a, c


def load_tile_model(
    card: ModelCard,
    backend: str,
    weights: Path | None,
    *,
    threads: int | None = None,
    precision: str | None = None,
    out_dtype: str | None = None,
) -> TileModel:
    """Build the runner for a card's architecture on the chosen backend (`weights` is None only
    for cards without a checkpoint, which only `vit` allows). `precision`: None or `auto` for
    TILEFM_PRECISION's choice; one the card or backend does not allow is a BackendError.
    `out_dtype`: the dtype the run stores embeddings in (None: the card's); a GPU hands back
    float16 only where that is float16."""
    if precision and precision != "auto":
        from tilefm.backends import resolve_precision

        resolve_precision(card, backend, precision)
    else:
        precision = None
    arch = architecture(card.architecture)
    if weights is None and arch.needs_weights:
        raise ModelError(f"{card.name!r} needs a weights file", field="model")
    model: TileModel = resolve(arch.model)(
        card, backend, weights, threads=threads, precision=precision, out_dtype=out_dtype
    )
    return model
