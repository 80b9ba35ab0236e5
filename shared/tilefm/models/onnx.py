"""Generic ONNX models over windows: any graph taking [N, bands, W, W] normalised inputs and giving
[N, K, W, W] class scores. Windows overlap and their softmax probabilities are blended."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tilefm.backends.onnxruntime import OrtSession
from tilefm.card import ModelCard
from tilefm.io.native import NATIVE_BATCH, NativeInput, to_tile
from tilefm.io.read import TileInput
from tilefm.models.base import TileModel, normalize
from tilefm.models.windows import blend_weights, window_offsets
from tilefm.values import TileOutput


def softmax(scores: np.ndarray, axis: int = 1) -> np.ndarray:
    """In place (the scores are not needed afterwards)."""
    scores -= scores.max(axis=axis, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=axis, keepdims=True)
    return scores


#: windows per call of the network on the native grid: a batch's distinct windows run in chunks,
#: since onnxruntime's activations for the U-Net grow with the chunk (a 30-tile run's peak RSS:
#: 2.6 GB in chunks of 32, 1.2 GB in chunks of 4, at the same CPU time); a GPU gets larger ones
NATIVE_CHUNK = 4
NATIVE_CHUNK_GPU = 32


class OnnxWindowModel(TileModel):
    def __init__(
        self,
        card: ModelCard,
        backend: str,
        weights: Path,
        *,
        threads: int | None = None,
        precision: str | None = None,
        out_dtype: str | None = None,
    ):
        """`precision` and `out_dtype` are taken as every architecture's are and not used: the
        graph runs as it was exported, and its class probabilities are float32."""
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

    def batch_size(self) -> int | None:
        """On the native grid a batch's tiles share their windows: `tilefm.io.native.NATIVE_BATCH`."""
        return NATIVE_BATCH if self.card.context.native else None

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
            valid: np.ndarray = np.asarray(t.valid.all(axis=0))
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

    def run(self, tiles: list[TileInput] | list[NativeInput]) -> list[TileOutput]:
        """Tiles need no preparation here: the window stack is a buffer reused per batch."""
        if not tiles:
            return []
        if isinstance(tiles[0], NativeInput):
            return self.run_native(tiles)
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

    def _native_windows(
        self, inputs: list[NativeInput]
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[tuple, list[int]], list[tuple]]:
        """Per input its normalised data and validity; per lattice window of the batch the inputs
        that hold it; and the windows to run (those with a valid pixel: the others would add
        nothing, their weight being zero everywhere)."""
        W = self.window
        prepared = []
        for inp in inputs:
            valid = np.asarray(inp.valid.all(axis=0))
            norm = normalize(self.card, inp.data)
            norm *= valid
            prepared.append((norm, valid))
        holders: dict[tuple, list[int]] = {}
        for k, inp in enumerate(inputs):
            for i, j in inp.windows():
                holders.setdefault((inp.grid, i, j), []).append(k)
        todo = []
        for key, ks in holders.items():
            oy, ox = inputs[ks[0]].window_offset(key[1], key[2])
            if prepared[ks[0]][1][oy : oy + W, ox : ox + W].any():
                todo.append(key)
        return prepared, holders, todo

    def _stack(
        self,
        inputs: list[NativeInput],
        prepared: list[tuple[np.ndarray, np.ndarray]],
        holders: dict[tuple, list[int]],
        keys: list[tuple],
    ) -> np.ndarray:
        W = self.window
        x = np.empty((len(keys), prepared[0][0].shape[0], W, W), np.float32)
        for n, key in enumerate(keys):
            k = holders[key][0]
            oy, ox = inputs[k].window_offset(key[1], key[2])
            x[n] = prepared[k][0][:, oy : oy + W, ox : ox + W]
        return x

    def native_stack(self, inputs: list[NativeInput]) -> np.ndarray:
        """The distinct windows a batch runs, stacked [N, bands, W, W] (what `predict` is given,
        chunk by chunk: for benchmarks of the model alone)."""
        prepared, holders, todo = self._native_windows(inputs)
        return self._stack(inputs, prepared, holders, todo)

    def run_native(self, inputs: list[NativeInput]) -> list[TileOutput]:
        """Inputs on the inference grid: each lattice window of the batch runs once (neighbouring
        tiles share most of theirs) and is blended into every tile region that holds it, then
        each region's blended sums go onto its tile's pixels (`tilefm.io.native.to_tile`)."""
        W = self.window
        prepared, holders, todo = self._native_windows(inputs)
        channels = len(self.card.output.classes) or self.card.output.channels
        acc = [np.zeros((channels, *v.shape), np.float32) for _, v in prepared]
        wsum = [np.zeros(v.shape, np.float32) for _, v in prepared]
        # blended chunk by chunk, so that a batch holds one chunk's scores, not all of them
        size = NATIVE_CHUNK_GPU if self.on_gpu else NATIVE_CHUNK
        for c in range(0, len(todo), size):
            chunk = todo[c : c + size]
            for key, p in zip(
                chunk, self.predict(self._stack(inputs, prepared, holders, chunk)), strict=True
            ):
                for k in holders[key]:
                    oy, ox = inputs[k].window_offset(key[1], key[2])
                    wv = self.weights * prepared[k][1][oy : oy + W, ox : ox + W]
                    acc[k][:, oy : oy + W, ox : ox + W] += p * wv
                    wsum[k][oy : oy + W, ox : ox + W] += wv
        outs = []
        for k, inp in enumerate(inputs):
            values, weight = to_tile(inp, acc[k], wsum[k])
            acc[k] = wsum[k] = None  # type: ignore[call-overload]  # each tile's buffers freed once used
            outs.append(TileOutput(tile=inp.tile, halo=0, values=values, weight=weight))
        return outs
