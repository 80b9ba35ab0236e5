"""The mosaic writer on synthetic tile outputs: order-free, seamless blending, bounded memory,
and the quantization it records."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from tilefm.engine.cog import stored_dtype
from tilefm.engine.stitch import MosaicWriter
from tilefm.grid import TILE_SIZE, plan_tiles
from tilefm.models import get_card
from tilefm.models.windows import blend_weights, window_offsets
from tilefm.values import Encoding, TileOutput

#: the cloud model's windows laid on the tiles (`context.grid: tile`): the halo blending that
#: tile-grid context models rely on (the card itself runs on the scene's grid, `tilefm.io.native`)
_csmask = get_card("ukis-csmask")
CLOUDS = _csmask.model_copy(update={"context": _csmask.context.model_copy(update={"grid": "tile"})})
PRESTO = get_card("presto")


def _plan():
    return plan_tiles(box(-11.6, 24.6, -11.0, 25.0), 11)


def _field(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """A smooth 3-class probability field over global pixel coordinates."""
    a = np.stack(np.broadcast_arrays(np.sin(gx / 150.0), np.cos(gy / 170.0), np.sin((gx + gy) / 210.0)))
    e = np.exp(3 * a)
    return (e / e.sum(0)).astype(np.float32)


def _window_outputs(plan) -> list[TileOutput]:
    """What the cloud model would send if every window saw the same smooth field."""
    ctx = CLOUDS.context
    h, W = ctx.halo, ctx.window
    w = blend_weights(ctx.window, ctx.overlap, ctx.blend)
    outs = []
    for t in plan.tiles:
        n = TILE_SIZE + 2 * h
        gx = t.x * TILE_SIZE - h + np.arange(n)
        gy = t.y * TILE_SIZE - h + np.arange(n)
        probs = _field(gx[None, :], gy[:, None])
        acc = np.zeros((3, n, n), np.float32)
        wsum = np.zeros((n, n), np.float32)
        for oy in window_offsets(ctx):
            for ox in window_offsets(ctx):
                acc[:, oy : oy + W, ox : ox + W] += probs[:, oy : oy + W, ox : ox + W] * w
                wsum[oy : oy + W, ox : ox + W] += w
        outs.append(TileOutput(tile=t, halo=h, values=acc, weight=wsum))
    return outs


def _write(plan, outputs, path: Path, card=CLOUDS, encoding=None) -> tuple[np.ndarray, int]:
    """The base level of the COG made from `outputs`, and the most tiles pending at once."""
    enc = encoding or Encoding.for_card(card)
    writer = MosaicWriter(plan, card, path.with_suffix(".mosaic.tif"), enc, halo=card.context.halo)
    peak = 0
    for o in outputs:
        writer.add(o)
        peak = max(peak, len(writer.pending))
    assert not writer.missing
    writer.close()
    writer.finish(path)
    with rasterio.open(path) as src:
        return src.read(), peak


def test_blend_is_the_field_and_order_free(tmp_path: Path) -> None:
    plan = _plan()
    outs = _window_outputs(plan)
    in_order, peak = _write(plan, outs, tmp_path / "a.tif")
    shuffled = outs[:]
    random.Random(3).shuffle(shuffled)
    any_order, _ = _write(plan, shuffled, tmp_path / "b.tif")
    assert (in_order == any_order).all()
    # where windows agree, blending gives back exactly their classes, tile edges included
    gx = plan.x_range[0] * TILE_SIZE + np.arange(plan.width)
    gy = plan.y_range[0] * TILE_SIZE + np.arange(plan.height)
    expected = _field(gx[None, :], gy[:, None]).argmax(0)
    got = in_order[0]
    written = got != 255
    assert written.mean() > 0.8
    assert (got[written] == expected[written]).all()
    # row-major arrival keeps about two rows of tiles pending, not the scene
    cols = plan.x_range[1] - plan.x_range[0] + 1
    assert peak <= 2 * cols + 2 < len(plan.tiles)


def test_every_tile_needs_all_its_neighbours(tmp_path: Path) -> None:
    plan = _plan()
    outs = _window_outputs(plan)
    writer = MosaicWriter(
        plan, CLOUDS, tmp_path / "c.tif", Encoding.for_card(CLOUDS), halo=CLOUDS.context.halo
    )
    for o in outs[:-1]:
        writer.add(o)
    assert writer.missing  # the last tile (and its neighbours) wait for it
    writer.add(outs[-1])
    assert not writer.missing
    writer.close()


@pytest.mark.parametrize("layout", ["bands-first", "pixel-interleaved-float16"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_embedding_quantization(tmp_path: Path, dtype: str, layout: str) -> None:
    """Outputs come bands-first in float32, or (Presto on a GPU) as float16 views of
    pixel-interleaved embeddings: stored the same either way."""
    plan = plan_tiles(box(-11.5, 24.7, -11.3, 24.85), 11)  # 2 x 2 tiles: how one is stored is checked
    assert len(plan.tiles) == 4
    rng = np.random.default_rng(0)
    outs, truth = [], {}
    for t in plan.tiles:
        v = rng.uniform(-5, 5, (128, TILE_SIZE, TILE_SIZE)).astype(np.float32)
        if layout != "bands-first":
            v16 = np.ascontiguousarray(v.astype(np.float16).transpose(1, 2, 0)).transpose(2, 0, 1)
            assert not v16.flags.c_contiguous
            v, given = v16.astype(np.float32), v16
        else:
            given = v
        wgt = np.ones((TILE_SIZE, TILE_SIZE), np.float32)
        wgt[:10] = 0  # no input here: must come out as nodata
        outs.append(TileOutput(tile=t, halo=0, values=given, weight=wgt))
        truth[t] = v
    enc = Encoding.for_card(PRESTO, dtype)
    data, _ = _write(plan, outs, tmp_path / "e.tif", card=PRESTO, encoding=enc)
    t = plan.tiles[len(plan.tiles) // 2]
    r, c = plan.offset(t)
    got = data[:, r : r + TILE_SIZE, c : c + TILE_SIZE].astype(np.float32)
    if dtype == "int8":
        assert (got[:, :10] == -128).all()
        deq = got[:, 10:] * enc.scale + enc.offset
        assert np.abs(deq - truth[t][:, 10:]).max() <= enc.scale / 2 + 1e-6
        with rasterio.open(tmp_path / "e.tif") as src:
            assert src.scales[0] == pytest.approx(enc.scale) and src.offsets[0] == pytest.approx(enc.offset)
    else:
        assert np.isnan(got[:, :10]).all()
        assert (
            np.abs(got[:, 10:] - truth[t][:, 10:]).max() <= 5 * 2.0**-11 * 1.0001
        )  # float16 rounding at |v| <= 5


@pytest.mark.parametrize("threads", [1, 4])
def test_per_patch_outputs_fill_their_parent_tiles(tmp_path: Path, threads: int) -> None:
    """At stride 16, each z12 tile's 16 x 16 output lands on its block of the z8 parent, in any
    order; patches of unplanned children and patches without data are nodata. The children are
    written on the mosaic's threads, and a parent is compressed only once all are in."""
    card = get_card("vit-small")
    plan = plan_tiles(box(-11.9, 24.5, -11.1, 25.1), 12)
    rng = np.random.default_rng(3)
    outputs = []
    for t in plan.tiles:
        w = np.ones((16, 16), np.float32)
        w[0, 0] = 0  # a patch without data
        outputs.append(
            TileOutput(
                tile=t,
                halo=0,
                values=rng.normal(size=(card.output.channels, 16, 16)).astype(np.float32),
                weight=w,
            )
        )
    random.Random(1).shuffle(outputs)
    path = tmp_path / "m.tif"
    writer = MosaicWriter(
        plan,
        card,
        tmp_path / "mosaic.tif",
        Encoding.for_card(card, "float32"),
        halo=0,
        out_plan=plan.coarsen(4),
        threads=threads,
    )
    for o in outputs:
        writer.add(o)
    writer.close()
    assert not writer.missing and writer.out_plan.zoom == 8
    writer.finish(path)
    with rasterio.open(path) as ds:
        assert ds.res[0] == pytest.approx(plan.transform.a * 16)
        data = ds.read()
    covered = np.zeros(data.shape[1:], bool)
    for o in outputs:
        row, col = writer.out_plan.offset(writer._parent(o.tile))
        r0 = row + (o.tile.y % 16) * 16
        c0 = col + (o.tile.x % 16) * 16
        block = data[:, r0 : r0 + 16, c0 : c0 + 16]
        assert np.isnan(block[:, 0, 0]).all()
        np.testing.assert_array_equal(block[:, 1:, :], o.values[:, 1:, :])
        covered[r0 : r0 + 16, c0 : c0 + 16] = True
    assert np.isnan(data[0][~covered]).all()


def _streamed_and_gdals(
    tmp_path: Path, plan, out_plan, card, enc: Encoding, outs: list[TileOutput]
) -> tuple[Path, Path, np.ndarray]:
    """The streamed COG of `outs` (two overview levels), the COG GDAL's driver copies from the
    writer's mosaic of the same outputs (`stream=False`), and the streamed COG's base."""
    cogs = []
    for stream in (None, False):
        writer = MosaicWriter(
            plan, card, tmp_path / f"mosaic-{stream}.tif", enc, halo=0, out_plan=out_plan, stream=stream
        )
        assert writer.streamed is (stream is None)
        for o in outs:
            writer.add(TileOutput(tile=o.tile, halo=o.halo, values=o.values.copy(), weight=o.weight.copy()))
        writer.close()
        cogs.append(tmp_path / f"cog-{stream}.tif")
        writer.finish(cogs[-1])
    ours, gdals = cogs
    with rasterio.open(ours) as a, rasterio.open(gdals) as b:
        assert a.overviews(1) == b.overviews(1) == [2, 4]
        assert (
            stored_dtype(a)
            == stored_dtype(b)
            == ("int8" if enc.dtype == "int8" else "float16" if enc.nbits == 16 else "float32")
        )
        full = a.read()
        np.testing.assert_array_equal(b.read(), full)  # the same base either way
    return ours, gdals, full


@pytest.mark.parametrize("per_patch", [True, False], ids=["per-patch", "full-resolution"])
def test_overviews_are_made_while_stitching(tmp_path: Path, per_patch: bool) -> None:
    """Float outputs: the writer makes every overview level from each tile (or per-patch
    child) as it is final, and the streamed COG holds them: nodata-aware means of the
    2^L x 2^L stored pixels below, rounded to float16; what GDAL's AVERAGE gives wherever it
    agrees with that."""
    base = get_card("vit-small" if per_patch else "presto")
    card = base.model_copy(update={"output": base.output.model_copy(update={"channels": 8})})
    if per_patch:
        plan = plan_tiles(box(0.1, 24.6, 22.4, 24.8), 10)  # a strip across four z6 parents
        out_plan, n = plan.coarsen(4), 16
        assert len(out_plan.tiles) == 4
    else:
        plan = plan_tiles(box(0.1, 24.6, 1.4, 24.8), 10)  # a strip of four z10 tiles
        out_plan, n = plan, TILE_SIZE
        assert len(plan.tiles) == 4
    assert out_plan.overview_levels == 2
    rng = np.random.default_rng(5)
    outs = []
    for t in plan.tiles:
        wgt = (
            (rng.uniform(size=(n // 16, n // 16)) > 0.2).repeat(16, 0).repeat(16, 1).astype(np.float32)
        )  # 16-px holes
        if not per_patch:
            wgt[rng.uniform(size=wgt.shape) < 0.02] = 0  # and single pixels
        outs.append(
            TileOutput(tile=t, halo=0, values=rng.uniform(-5, 5, (8, n, n)).astype(np.float32), weight=wgt)
        )
    random.Random(2).shuffle(outs)
    ours, gdals, full = _streamed_and_gdals(tmp_path, plan, out_plan, card, Encoding.for_card(card), outs)
    C, H, W = full.shape
    for level in (1, 2):
        f = 1 << level
        blocks = full.reshape(C, H // f, f, W // f, f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nodata blocks
            expected = (
                np.nanmean(blocks.astype(np.float64), axis=(2, 4)).astype(np.float16).astype(np.float32)
            )
        with (
            rasterio.open(ours, OVERVIEW_LEVEL=level - 1) as o,
            rasterio.open(gdals, OVERVIEW_LEVEL=level - 1) as g,
        ):
            got, gdal = o.read(), g.read()
        nan = np.isnan(expected)
        assert nan.any() and not nan.all()
        assert (np.isnan(got) == nan).all() and (np.isnan(gdal) == nan).all()
        ulp = 2.0**-8  # float16 at 4 <= |v| < 8
        assert np.abs(got[~nan] - expected[~nan]).max() <= ulp
        assert (got[~nan] == expected[~nan]).mean() > 0.99
        # GDAL makes level 2 from level 1 (means of means): the same where no pixel was nodata
        whole = ~np.isnan(blocks).any(axis=(2, 4))
        assert whole.sum() > 100
        assert np.abs(got[whole] - gdal[whole]).max() <= 2 * ulp  # GDAL truncates to float16, we round


@pytest.mark.parametrize("per_patch", [True, False], ids=["per-patch", "full-resolution"])
def test_int8_outputs_are_streamed_with_their_overviews(tmp_path: Path, per_patch: bool) -> None:
    """int8 embeddings are streamed too: each level the mean of the quantized values below
    (nodata -128 left out) rounded half away from zero, GDAL's AVERAGE at the first level; the scale and
    offset that undo the quantization are the file's own, as GDAL writes them."""
    base = get_card("vit-small" if per_patch else "presto")
    out = base.output.model_copy(update={"channels": 6, "value_range": (-6.0, 6.0)})
    card = base.model_copy(update={"output": out})
    plan = (
        plan_tiles(box(0.1, 24.6, 22.4, 24.8), 10) if per_patch else plan_tiles(box(0.1, 24.6, 1.4, 24.8), 10)
    )
    out_plan, n = (plan.coarsen(4), 16) if per_patch else (plan, TILE_SIZE)
    rng = np.random.default_rng(9)
    outs = []
    for t in plan.tiles:
        wgt = (rng.uniform(size=(n // 16, n // 16)) > 0.2).repeat(16, 0).repeat(16, 1).astype(np.float32)
        outs.append(
            TileOutput(tile=t, halo=0, values=rng.uniform(-6, 6, (6, n, n)).astype(np.float32), weight=wgt)
        )
    random.Random(3).shuffle(outs)
    enc = Encoding.for_card(card, "int8")
    ours, gdals, full = _streamed_and_gdals(tmp_path, plan, out_plan, card, enc, outs)
    with rasterio.open(ours) as ds:
        assert ds.dtypes[0] == "int8" and ds.nodata == -128
        assert ds.scales == (pytest.approx(enc.scale),) * 6 and ds.offsets == (pytest.approx(enc.offset),) * 6
    assert (full == -128).any() and (full > -128).mean() > 0.04
    C, H, W = full.shape
    for level in (1, 2):
        f = 1 << level
        blocks = np.where(full == -128, np.nan, full.astype(np.float64)).reshape(C, H // f, f, W // f, f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(blocks, axis=(2, 4))
        m = np.nan_to_num(mean)
        expected = np.where(np.isnan(mean), -128, np.sign(m) * np.floor(np.abs(m) + 0.5))
        with (
            rasterio.open(ours, OVERVIEW_LEVEL=level - 1) as o,
            rasterio.open(gdals, OVERVIEW_LEVEL=level - 1) as g,
        ):
            got, gdal = o.read().astype(np.float64), g.read().astype(np.float64)
        np.testing.assert_array_equal(got, expected)
        whole = ~np.isnan(blocks).any(axis=(2, 4))
        assert whole.sum() > 50
        if level == 1:  # GDAL's level 2 averages its level 1 (and rounds twice)
            np.testing.assert_array_equal(got, gdal)
        assert np.abs(got[whole] - gdal[whole]).max() <= 1
