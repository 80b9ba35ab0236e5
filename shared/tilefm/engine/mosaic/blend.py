"""Halo blending: each full-resolution tile output's weighted sums added into its own tile's
accumulator and, through its halo, its neighbours'. A tile of the mosaic is final once every
planned tile whose halo reaches it has contributed; its accumulator is then handed on and
dropped, so memory follows the tiles in flight, not the scene."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from tilefm.grid import TILE_SIZE, Tile
from tilefm.values import TileOutput


@dataclass
class Acc:
    """A tile of the mosaic being blended: the weighted sums of its contributions, their
    weights, and how many contributions it still waits for."""

    values: np.ndarray
    weight: np.ndarray
    remaining: int


class HaloBlender:
    """Accumulates full-resolution tile outputs, halos included, per tile of the mosaic.

    Args:
        tiles: the planned tiles, whose outputs come.
        planned: the tiles of the mosaic (those of `tiles`' plan).
        halo: pixels each output reaches past its tile.
        final: called with each tile of the mosaic and its accumulator once every planned tile
            whose halo reaches it has contributed (on the caller's thread); the accumulator is
            then `final`'s.
    """

    def __init__(
        self, tiles: Iterable[Tile], planned: Iterable[Tile], halo: int, final: Callable[[Tile, Acc], None]
    ):
        self.halo = halo
        self.planned = set(planned)
        self.final = final
        #: the contributions each tile of the mosaic waits for
        self.expected: dict[Tile, int] = {t: self._expected(t) for t in tiles}
        self.pending: dict[Tile, Acc] = {}

    def _neighbours(self, tile: Tile) -> list[Tile]:
        if self.halo == 0:
            return [tile]
        reach = math.ceil(self.halo / TILE_SIZE)
        return [
            Tile(tile.x + dx, tile.y + dy, tile.z)
            for dy in range(-reach, reach + 1)
            for dx in range(-reach, reach + 1)
        ]

    def _expected(self, tile: Tile) -> int:
        return sum(1 for n in self._neighbours(tile) if n in self.planned)

    def _acc(self, tile: Tile, channels: int) -> Acc:
        """The accumulator of an output tile, made on its first contribution."""
        acc = self.pending.get(tile)
        if acc is None:
            acc = self.pending[tile] = Acc(
                np.zeros((channels, TILE_SIZE, TILE_SIZE), np.float32),
                np.zeros((TILE_SIZE, TILE_SIZE), np.float32),
                self.expected[tile],
            )
        return acc

    def add(self, out: TileOutput) -> None:
        """Add one tile's output (and its halo's share to the neighbours); hand on what is final."""
        h = out.halo
        ox, oy = out.tile.x * TILE_SIZE - h, out.tile.y * TILE_SIZE - h  # global pixel origin
        n = out.weight.shape[0]
        for t in self._neighbours(out.tile):
            if t not in self.planned:
                continue
            tx, ty = t.x * TILE_SIZE, t.y * TILE_SIZE
            x0, x1 = max(ox, tx), min(ox + n, tx + TILE_SIZE)
            y0, y1 = max(oy, ty), min(oy + n, ty + TILE_SIZE)
            if x0 >= x1 or y0 >= y1:
                continue
            acc = self._acc(t, out.values.shape[0])
            src = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
            dst = (slice(y0 - ty, y1 - ty), slice(x0 - tx, x1 - tx))
            if acc.remaining == self.expected[t] and h == 0:
                acc.values = out.values  # sole contribution: no copy
                acc.weight = out.weight
            else:
                acc.values[(slice(None), *dst)] += out.values[(slice(None), *src)]
                acc.weight[dst] += out.weight[src]
            acc.remaining -= 1
            if acc.remaining == 0:
                self.final(t, self.pending.pop(t))
