"""Overlapping windows and their blending weights (tilefm.models.windows)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tilefm.card import Context
from tilefm.grid import TILE_SIZE
from tilefm.models import get_card
from tilefm.models.windows import blend_weights, window_offsets

WINDOW = 256


def _tiled_sum(weights: np.ndarray, stride: int, copies: int = 8) -> np.ndarray:
    """Sum of copies of `weights` laid on a lattice of spacing `stride`, over a square plane."""
    window = weights.shape[0]
    size = (copies - 1) * stride + window
    plane = np.zeros((size, size), np.float64)
    for i in range(copies):
        for j in range(copies):
            plane[i * stride : i * stride + window, j * stride : j * stride + window] += weights
    return plane


def _interior(plane: np.ndarray, window: int) -> np.ndarray:
    """Away from the borders: every pixel there is covered by all the windows it can be."""
    return plane[window:-window, window:-window]


@pytest.fixture(scope="module")
def csmask_ctx() -> Context:
    return get_card("ukis-csmask").context


def test_card_context(csmask_ctx: Context):
    # on the scene's own grid: its reads span whole windows, so no halo around the tile
    assert (csmask_ctx.window, csmask_ctx.overlap, csmask_ctx.stride, csmask_ctx.halo) == (256, 192, 64, 0)
    assert csmask_ctx.blend == "sine" and csmask_ctx.grid == "native"
    # the same windows on the tile grid read a halo of half the overlap
    assert csmask_ctx.model_copy(update={"grid": "tile"}).halo == 96


def test_context_grid_checks():
    with pytest.raises(ValidationError, match="per-pixel"):
        Context(per_pixel=True, grid="native")
    # a native grid has no tile to divide: any stride will do; the tile grid's must divide 256
    assert Context(window=96, overlap=16, grid="native").stride == 80
    with pytest.raises(ValidationError, match="must divide"):
        Context(window=96, overlap=16, grid="tile")


@pytest.mark.parametrize("overlap", [0, 64, 128, 192])
def test_blend_weights_partition_of_unity(overlap: int):
    """Copies at stride window - overlap sum to a constant (1 for ramps that meet in pairs, 2 per
    axis for the Hann bump at a quarter-window stride), so blending has no visible window edges."""
    stride = WINDOW - overlap
    w = blend_weights(WINDOW, overlap)
    assert w.shape == (WINDOW, WINDOW) and w.dtype == np.float32
    interior = _interior(_tiled_sum(w, stride), WINDOW)
    assert interior.size > 0
    expected = {0: 1.0, 64: 1.0, 128: 1.0, 192: 4.0}[overlap]  # 2-D: the 1-D constant squared
    np.testing.assert_allclose(interior, expected, rtol=2e-6)


def test_card_weights_tile_the_plane(csmask_ctx: Context):
    w = blend_weights(csmask_ctx.window, csmask_ctx.overlap, csmask_ctx.blend)
    interior = _interior(_tiled_sum(w, csmask_ctx.stride), csmask_ctx.window)
    assert np.ptp(interior) <= 1e-5 * interior.mean()
    # the normalised sum (what the stitcher divides by) is exactly 1
    np.testing.assert_allclose(interior / interior.mean(), 1.0, atol=1e-5)


@pytest.mark.parametrize("overlap", [0, 64, 128, 192])
def test_blend_weights_positive_and_symmetric(overlap: int):
    w = blend_weights(WINDOW, overlap).astype(np.float64)
    assert (w > 0).all()  # even the corner pixels count a little, so no pixel's sum is 0
    assert w.max() <= 1.0
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(w, w[::-1, :])
    np.testing.assert_array_equal(w, w[:, ::-1])
    c = WINDOW // 2
    assert w[c, c] == pytest.approx(1.0, abs=1e-4)  # full weight in the middle
    if overlap:
        assert w[0, 0] < w[c, c] and w[0, c] < w[c, c]
        # monotone ramp from the edge to the middle
        assert (np.diff(w[c, :c]) >= 0).all()
    else:
        assert (w == 1).all()


def test_blend_weights_none_and_cache():
    assert (blend_weights(WINDOW, 192, "none") == 1).all()
    w = blend_weights(WINDOW, 192)
    assert blend_weights(WINDOW, 192) is w  # cached ...
    assert not w.flags.writeable  # ... so read-only


@pytest.mark.parametrize("overlap", [0, 128, 192])
def test_window_offsets_span_tile_and_halo(overlap: int):
    ctx = Context(window=WINDOW, overlap=overlap)
    offsets = window_offsets(ctx)
    assert offsets[0] == 0
    assert np.all(np.diff(offsets) == ctx.stride)
    assert len(offsets) == TILE_SIZE // ctx.stride
    # the windows exactly span the tile-plus-halo read
    assert offsets[-1] + ctx.window == TILE_SIZE + 2 * ctx.halo
    # each window's centre (in tile pixels) lies inside the tile, one per stride cell
    centres = np.array(offsets) - ctx.halo + ctx.window / 2
    assert (centres > 0).all() and (centres < TILE_SIZE).all()
    np.testing.assert_array_equal(centres, np.arange(len(offsets)) * ctx.stride + ctx.stride / 2)
    # neighbouring tiles continue the same lattice (one global grid of windows)
    starts = np.concatenate([np.array(offsets) - ctx.halo + k * TILE_SIZE for k in range(3)])
    assert np.all(np.diff(starts) == ctx.stride)


def test_window_offsets_card(csmask_ctx: Context):
    tile_ctx = csmask_ctx.model_copy(update={"grid": "tile"})  # the card's windows laid on the tiles
    assert window_offsets(tile_ctx) == [0, 64, 128, 192]
    assert window_offsets(tile_ctx)[-1] + tile_ctx.window == TILE_SIZE + 2 * tile_ctx.halo == 448
    presto = get_card("presto").context
    assert presto.per_pixel and presto.halo == 0 and window_offsets(presto) == [0]


def test_context_rejects_strides_not_dividing_the_tile():
    with pytest.raises(ValidationError, match="must divide the 256-pixel tile"):
        Context(window=WINDOW, overlap=64)  # stride 192
    with pytest.raises(ValidationError, match="even"):
        Context(window=WINDOW, overlap=63)
    with pytest.raises(ValidationError):
        Context(window=WINDOW, overlap=WINDOW)
