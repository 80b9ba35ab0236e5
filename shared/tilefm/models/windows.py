"""Overlapping windows and their blending weights.

A model with spatial context runs on windows of `window` pixels at stride `window - overlap`,
laid on one global grid anchored at the tile grid and offset by half the overlap. The windows that
belong to a tile (their centres fall inside it) then exactly span the tile plus a halo of
`overlap / 2`, so each tile is read once, and every pixel of the scene is covered by the same
windows whichever tile computed them. Scores are blended with weights that ramp as sin^2 across
each overlap: where two windows meet the weights sum to 1, so no window or tile edge can show.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tilefm.card import Context
from tilefm.grid import TILE_SIZE


def window_offsets(ctx: Context) -> list[int]:
    """Offsets (pixels) of a tile's windows inside its tile-plus-halo read, along one axis."""
    n = TILE_SIZE // ctx.stride
    return [k * ctx.stride for k in range(n)]


@lru_cache(maxsize=8)
def blend_weights(window: int, overlap: int, kind: str = "sine") -> np.ndarray:
    """[window, window] float32 weights; 1 in the middle, sin^2 ramps over `overlap` at the edges.

    From half overlap on, the ramps meet and the weight is one sin^2 bump (a Hann window), whose
    copies at any stride dividing window/2 also sum to a constant.
    """
    w1 = np.ones(window, np.float64)
    if kind == "sine" and overlap >= window // 2:
        w1 = np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2
    elif kind == "sine" and overlap > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w1[:overlap] = ramp
        w1[window - overlap :] = ramp[::-1]
    w = np.outer(w1, w1).astype(np.float32)
    w.setflags(write=False)
    return w
