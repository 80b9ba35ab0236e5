"""What the mosaic is built of: reused buffers, blocks filled piece by piece, where a planned
tile's output goes in the mosaic, and how blended values are stored."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tilefm.grid import TILE_SIZE, Tile, TilePlan
from tilefm.values import CLASS_NODATA, Encoding


class Buffers:
    """Arrays handed from the stitcher to the writer thread and back: a fresh 200 MB parent tile
    costs ~250 ms of page faults, a reused one a refill (~7 ms).

    Args:
        keep: arrays of each shape and dtype kept for reuse; the rest given back are dropped.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, a: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault((a.shape, a.dtype.name), [])
            if len(free) < self.keep:
                free.append(a)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@dataclass
class Block:
    """A block of the mosaic filled piece by piece (a parent tile by its children, a block of
    an overview level by the tiles below it). What no piece covered is set to nodata once the
    block is complete: filling every block with nodata ahead took ~40% of the stitching
    thread's time for a 768-band output."""

    values: np.ndarray  # [C, 256, 256]
    remaining: int
    filled: np.ndarray  # [256 / piece, 256 / piece] bool: the pieces given
    #: pieces given but not yet written (a parent's children, written on the mosaic's threads)
    unwritten: int = 0

    @classmethod
    def of(cls, values: np.ndarray, expected: int, piece: int) -> Block:
        """A block of `values` ([C, 256, 256]) to be filled by `expected` pieces, each `piece`
        pixels square."""
        return cls(values, expected, np.zeros((TILE_SIZE // piece,) * 2, bool))

    def piece(self, row: int, col: int, n: int) -> np.ndarray:
        """The n x n piece at (row, col) of the block, to be written by the caller."""
        self.filled[row // n, col // n] = True
        self.remaining -= 1
        return self.values[:, row : row + n, col : col + n]

    def complete(self, nodata: float) -> np.ndarray:
        if not self.filled.all():
            n = TILE_SIZE // len(self.filled)
            self.values.transpose(1, 2, 0)[~self.filled.repeat(n, 0).repeat(n, 1)] = nodata
        return self.values


class MosaicGrid:
    """Where the planned tiles' outputs go in the mosaic, whose plan may be coarser than the
    tiles' (per-patch outputs: each output tile filled by its planned children's outputs).

    Args:
        plan: the tiles' plan.
        target: the mosaic's plan, `k` zooms above the tiles' (0: the same zoom).
    """

    def __init__(self, plan: TilePlan, target: TilePlan):
        self.plan = plan
        self.target = target
        self.k = plan.zoom - target.zoom

    def parent(self, tile: Tile) -> Tile:
        return Tile(tile.x >> self.k, tile.y >> self.k, tile.z - self.k)

    def origin(self, tile: Tile) -> tuple[int, int]:
        """Pixel (row, col) in the mosaic where a planned tile's output goes."""
        t, n = self.parent(tile), TILE_SIZE >> self.k
        row, col = self.target.offset(t)
        return row + (tile.y - (t.y << self.k)) * n, col + (tile.x - (t.x << self.k)) * n

    def key(self, tile: Tile) -> tuple[int, int]:
        """The (x, y) block of the mosaic's full resolution that a tile of its plan is."""
        row, col = self.target.offset(tile)
        return col // TILE_SIZE, row // TILE_SIZE

    @staticmethod
    def block_of(origin: tuple[int, int], level: int) -> tuple[int, int]:
        """The (x, y) block of an overview level that holds a pixel of the mosaic."""
        return (origin[1] >> level) // TILE_SIZE, (origin[0] >> level) // TILE_SIZE

    def pieces(self, level: int) -> Counter[tuple[int, int]]:
        """How many planned tiles' outputs each block of a level (0: the full resolution) holds."""
        return Counter(self.block_of(self.origin(t), level) for t in self.plan.tiles)


class Quantizer:
    """Blended values as stored: class maps by argmax, the rest by the encoding.

    Args:
        encoding: how the values are stored.
        classes: a class map (the argmax of the blended class scores).
    """

    def __init__(self, encoding: Encoding, classes: bool):
        self.encoding = encoding
        self.classes = classes
        self._half: dict[tuple[int, ...], np.ndarray] = {}

    def encode_into(self, values: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        """Blended values as stored, into `out`: classes by argmax, the rest by the encoding."""
        if self.classes:
            out[0] = np.argmax(values, axis=0)
            out[:, weight <= 0] = CLASS_NODATA
            return
        half = self._half.get(values.shape)
        if half is None and self.encoding.nbits == 16 and out.dtype != np.float16:
            half = self._half[values.shape] = np.empty(values.shape, np.float16)
        self.encoding.encode_into(values, weight, out, half)

    def clear(self) -> None:
        self._half.clear()
