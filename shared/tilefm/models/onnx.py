"""Generic ONNX models over windows: any graph taking [N, bands, W, W] normalised inputs and giving
[N, K, W, W] class scores. Windows overlap and their softmax probabilities are blended."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tilefm.backends.onnxruntime import OrtSession
from tilefm.models.base import TileModel, TileOutput, normalize
from tilefm.models.card import ModelCard
from tilefm.read import TileInput
from tilefm.windows import blend_weights, window_offsets


def softmax(scores: np.ndarray, axis: int = 1) -> np.ndarray:
    """In place (the scores are not needed afterwards)."""
    scores -= scores.max(axis=axis, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=axis, keepdims=True)
    return scores


class OnnxWindowModel(TileModel):
    def __init__(self, card: ModelCard, backend: str, weights: Path, *, threads: int | None = None):
        super().__init__(card, backend)
        if backend != "onnxruntime":
            raise ValueError(f"ONNX graphs run on onnxruntime, not {backend!r}")
        self.session = OrtSession(weights, threads=threads)
        self.input_name = card.onnx_input or self.session.input_names[0]
        ctx = card.context
        self.window = ctx.window
        self.offsets = window_offsets(ctx)
        self.weights = blend_weights(ctx.window, ctx.overlap, ctx.blend)
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def on_gpu(self) -> bool:
        return "CUDAExecutionProvider" in self.session.providers

    def windows(self, tiles: list[TileInput]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised window stack [N, bands, W, W] and validity [N, W, W] (all bands present)."""
        W, offs = self.window, self.offsets
        shape = (len(tiles) * len(offs) ** 2, tiles[0].data.shape[0], W, W)
        if self._buffers is None or self._buffers[0].shape != shape:
            # reused from batch to batch: a fresh 100 MB stack per batch costs more in page
            # faults than the copying itself
            self._buffers = (np.empty(shape, np.float32), np.empty((shape[0], W, W), bool))
        x, v = self._buffers
        k = 0
        for t in tiles:
            valid = t.valid.all(axis=0)
            # invalid pixels become the band mean (0 after normalising): no signal, and no weight below
            norm = normalize(self.card, t.data)
            norm *= valid
            for oy in offs:
                for ox in offs:
                    x[k] = norm[:, oy : oy + W, ox : ox + W]
                    v[k] = valid[oy : oy + W, ox : ox + W]
                    k += 1
        return x, v

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [N, K, W, W] for a window stack (the model alone, no I/O)."""
        return softmax(self.session(**{self.input_name: x})[0], axis=1)

    def run(self, tiles: list[TileInput]) -> list[TileOutput]:
        """Tiles need no preparation here: the window stack is a buffer reused per batch."""
        if not tiles:
            return []
        x, valid = self.windows(tiles)
        probs = self.predict(x)
        return self.blend(tiles, probs, valid)

    def blend(self, tiles: list[TileInput], probs: np.ndarray, valid: np.ndarray) -> list[TileOutput]:
        W = self.window
        per_tile = len(self.offsets) ** 2
        outs = []
        for i, t in enumerate(tiles):
            n = t.size
            acc = np.zeros((probs.shape[1], n, n), np.float32)
            wsum = np.zeros((n, n), np.float32)
            k = i * per_tile
            for oy in self.offsets:
                for ox in self.offsets:
                    w = self.weights * valid[k]
                    acc[:, oy : oy + W, ox : ox + W] += probs[k] * w
                    wsum[oy : oy + W, ox : ox + W] += w
                    k += 1
            outs.append(TileOutput(tile=t.tile, halo=t.halo, values=acc, weight=wsum))
        return outs
