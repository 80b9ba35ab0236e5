"""The streamed COG's overview levels, made while stitching: each final tile (or per-patch child)
gives its share of every level, and a level's block is final once every planned tile below it has."""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from tilefm.engine.mosaic.blocks import Block, MosaicGrid
from tilefm.grid import TILE_SIZE
from tilefm.values import INT8_NODATA, Encoding

if TYPE_CHECKING:
    from tilefm.engine.mosaic.sinks import MosaicSink

#: level blocks a tile (or children) completed: (level, (x, y) block, [C, 256, 256] stored values)
Done = list[tuple[int, tuple[int, int], np.ndarray]]


class OverviewPyramid:
    """Every overview level of the mosaic, as means of the stored pixels below.

    Args:
        grid: where the planned tiles' outputs go.
        expected: for each level (0: the full resolution, not made here), the planned tiles
            below each of its blocks (`MosaicGrid.pieces`).
        encoding: how values are stored (its nodata; 16 bits: means rounded to float16).
        sink: where the level blocks' memory comes from (`new_block`, in the dtype it stores).
    """

    def __init__(
        self, grid: MosaicGrid, expected: list[Counter[tuple[int, int]]], encoding: Encoding, sink: MosaicSink
    ):
        self.grid = grid
        self.encoding = encoding
        self.sink = sink
        self._level_expected = expected
        self._level_blocks: list[dict[tuple[int, int], Block]] = [{} for _ in expected]
        self._levels_lock = threading.Lock()

    def reduce(self, block: np.ndarray, origin: tuple[int, int], valid: np.ndarray) -> Done:
        """A final tile's (or child's) share of each overview level: the mean of the stored
        values below each pixel, nodata (pixels no tile covered: `valid` false) left out,
        rounded as the base is (int8: to the nearest quantized value, halves away from zero).
        Sums and counts are halved level by level, so every level is the mean over the base;
        GDAL's AVERAGE gives the same at the first level, and below averages the level above
        (means of means), which over-weights the pixels of a block that was partly nodata.
        Returns the level blocks this completed (every planned tile below them has given its
        share), to be compressed. Thread-safe."""
        import torch

        # pixels-last [H, W, C] (the streamed blocks' memory order): each sum of a 2 x 2 window
        # adds runs of C contiguous values; avg_pool2d over these strides was ~15x slower
        t = torch.from_numpy(block).permute(1, 2, 0)
        if bool(valid.all()):  # the count of a level is then 4^level everywhere
            return self.place(t[None], None, [origin])
        mask = torch.from_numpy(np.ascontiguousarray(valid))[:, :, None]
        return self.place(torch.where(mask, t, 0.0)[None], mask.to(torch.float32)[None], [origin])

    def place(self, total: Any, count: Any, origins: list[tuple[int, int]]) -> Done:
        """Each overview level's means of [m, H, W, C] stored pixels (`count`: how many of the
        pixels below had data, [m, H, W, 1]; None: all of them), put where the m pieces at
        `origins` (their rows and columns in the mosaic) go; returns the level blocks completed."""
        import torch

        dtype = self.sink.dtype
        out = torch_dtype(dtype)
        done: list[tuple[int, tuple[int, int], Block]] = []
        for level in range(1, len(self._level_blocks)):
            total = _sum_2x2(total)
            if count is None:
                mean = total / float(4**level)
            else:
                count = _sum_2x2(count)
                mean = total / count  # 0 / 0: NaN, the nodata value
            if self.encoding.nbits == 16:
                mean = mean.to(torch.float16)
            elif (
                out == torch.int8
            ):  # quantized values: their mean rounded half away from zero, as GDAL's AVERAGE
                mean = torch.nan_to_num(torch.sign(mean) * torch.floor(mean.abs() + 0.5), nan=INT8_NODATA)
            means = mean.to(out).numpy()
            n = means.shape[1]
            with self._levels_lock:  # numpy copies: each a few kB, quicker with the GIL kept
                for (row, col), piece in zip(origins, means, strict=True):
                    key = self.grid.block_of((row, col), level)
                    block = self._level_blocks[level].get(key)
                    if block is None:
                        block = self._level_blocks[level][key] = Block.of(
                            self.sink.new_block(), self._level_expected[level][key], n
                        )
                    block.piece((row >> level) % TILE_SIZE, (col >> level) % TILE_SIZE, n).transpose(1, 2, 0)[
                        ...
                    ] = piece
                    if block.remaining == 0:
                        done.append((level, key, self._level_blocks[level].pop(key)))
        return [(level, key, b.complete(self.encoding.nodata)) for level, key, b in done]

    def clear(self) -> None:
        """Drop the level blocks being filled (not held through the COG step)."""
        self._level_blocks = [{} for _ in self._level_blocks]


def torch_dtype(name: str) -> Any:
    """A stored dtype's torch dtype (float16, float32, int8)."""
    import torch

    return getattr(torch, name)


def _sum_2x2(x: Any) -> Any:
    """Sums of 2 x 2 windows of an [..., H, W, C] tensor, in float32 (float16 values are taken
    as they are added: no float32 copy of the whole block)."""
    import torch

    total = x[..., 0::2, 0::2, :].to(torch.float32, copy=True)
    total += x[..., 0::2, 1::2, :]
    total += x[..., 1::2, 0::2, :]
    total += x[..., 1::2, 1::2, :]
    return total
