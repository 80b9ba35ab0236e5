"""Inference on the scene's own grid (tilefm.io.native): the grid, the window lattice, the reads
onto it, and the resampling of blended scores onto tiles, checked against direct rasterio reads
of the sample scene and GDAL's warper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject

from tilefm.engine.fidelity import ResamplingError, input_grid
from tilefm.grid import TMS, Tile, plan_tiles
from tilefm.io.native import InferenceGrid, WindowLattice, read_native, to_tile
from tilefm.io.scene import open_scene
from tilefm.models import get_card

ZOOM = 11


@pytest.fixture(scope="module")
def scene(scene_dir: Path):
    return open_scene({"s2": str(scene_dir)})


@pytest.fixture(scope="module")
def card():
    return get_card("ukis-csmask")


@pytest.fixture(scope="module")
def inner(scene) -> list[Tile]:
    """Two horizontal neighbours well inside the scene."""
    t = TMS.tile(-11.45, 24.85, ZOOM)
    return [Tile(t.x, t.y, ZOOM), Tile(t.x + 1, t.y, ZOOM)]


def test_grid_is_the_finest_band_s(scene, card, scene_dir: Path) -> None:
    grid = InferenceGrid.of(scene, card)
    with rasterio.open(scene_dir / "B02.tif") as src:
        assert grid.affine == src.transform and (grid.width, grid.height) == (src.width, src.height)
        assert rasterio.crs.CRS.from_user_input(grid.crs) == src.crs
    assert grid.factor == 1 and grid.describe() == "EPSG:32629 100 m"
    # a card trained on pixels three times the scene's takes the scene's pixels three by three
    coarse = InferenceGrid.of(scene, card.model_copy(update={"gsd_m": 330.0}))
    assert coarse.factor == 3 and coarse.res == 300.0 and coarse.width == 366
    assert coarse.describe().endswith("(scene pixels x3)")


@pytest.mark.parametrize("window,stride", [(256, 64), (256, 128), (96, 80), (7, 3)])
def test_lattice_covers_every_pixel_alike(window: int, stride: int) -> None:
    lat = WindowLattice(window, stride)
    cover = np.zeros(40 * stride, int)
    for i in lat.covering(-window, len(cover) + window):
        s = lat.start(i)
        cover[max(s, 0) : max(s + window, 0)] += 1
    # every pixel lies in the same number of windows (ceil or floor of window / stride)
    assert set(np.unique(cover)) <= {window // stride, -(-window // stride)}
    # `covering` finds exactly the windows that touch a span
    for p0, p1 in [(0, 1), (5, 17), (-3, 200), (130, 131)]:
        touching = [i for i in range(-50, 200) if lat.start(i) < p1 and lat.start(i) + window > p0]
        assert list(lat.covering(p0, p1)) == touching


def test_reads_are_the_scene_s_own_pixels(scene, card, inner, scene_dir: Path) -> None:
    a, b = read_native(scene, card, inner)
    lat = WindowLattice.of(card.context)
    assert a.data.shape[0] == 6 and a.band_names == [
        "s2:B02",
        "s2:B03",
        "s2:B04",
        "s2:B08",
        "s2:B11",
        "s2:B12",
    ]
    for inp in (a, b):
        h, w = inp.data.shape[1:]
        assert (h - lat.window) % lat.stride == 0 and (w - lat.window) % lat.stride == 0
        assert inp.valid.all()  # well inside the scene
    r, c = a.origin
    h, w = a.data.shape[1:]
    with rasterio.open(scene_dir / "B02.tif") as src:
        b02 = src.read(1, window=((r, r + h), (c, c + w))).astype(np.float32)
    np.testing.assert_array_equal(a.data[0], b02)  # 10 m bands: the very pixels
    with rasterio.open(scene_dir / "B11.tif") as src:  # 20 m bands: each pixel repeated 2 x 2
        b11 = src.read(1, window=((r // 2, (r + h + 1) // 2 + 1), (c // 2, (c + w + 1) // 2 + 1))).astype(
            np.float32
        )
    rep = np.repeat(np.repeat(b11, 2, 0), 2, 1)[r % 2 : r % 2 + h, c % 2 : c % 2 + w]
    np.testing.assert_array_equal(a.data[4], rep)
    # neighbours read the pixels they share alike
    (ra, ca), (rb, cb) = a.origin, b.origin
    assert ra == rb and cb > ca
    overlap = a.data.shape[2] - (cb - ca)
    assert overlap > lat.window
    np.testing.assert_array_equal(a.data[:, :, cb - ca :], b.data[:, :, :overlap])


def test_reads_off_the_scene_are_invalid(scene, card) -> None:
    plan = plan_tiles(scene.footprint, ZOOM)
    corner = plan.tiles[0]  # the top-left tile: partly off the scene
    (inp,) = read_native(scene, card, [corner])
    assert inp.valid.any() and not inp.valid.all()
    assert (inp.data[~inp.valid] == 0).all()


def test_to_tile_is_gdal_s_warp_of_the_sums(scene, card, inner) -> None:
    (inp,) = read_native(scene, card, inner[:1])
    h, w = inp.data.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sums = np.stack([xx, yy, xx * 0 + 3])
    weight = np.ones((h, w), np.float32)
    values, wt = to_tile(inp, sums, weight)
    assert values.shape == (3, 256, 256) and wt.shape == (256, 256)
    np.testing.assert_allclose(wt, 1.0, atol=1e-5)  # the region covers the whole tile
    np.testing.assert_allclose(values[2], 3.0, atol=1e-4)
    # a ramp on the grid stays a ramp: the tile's pixel centres in grid columns, by GDAL
    b = TMS.xy_bounds(inp.tile.x, inp.tile.y, inp.tile.z)
    res = (b.right - b.left) / 256
    expected = np.zeros((256, 256), np.float32)
    reproject(
        xx,
        expected,
        src_transform=inp.region_transform,
        src_crs=inp.grid.crs,
        dst_transform=Affine(res, 0, b.left, 0, -res, b.top),
        dst_crs="EPSG:3857",
        resampling=Resampling.bilinear,
    )
    np.testing.assert_allclose(values[0], expected, atol=1e-3)
    assert np.ptp(values[0]) > 100  # the tile spans ~180 grid columns


def test_zoom_and_grid_reasons(scene, card) -> None:
    grid = input_grid(scene, card, None)
    assert grid.kind == "native" and grid.zoom == 11 and grid.pixel_m == 100.0
    assert "zoom 11 by default" in grid.zoom_reason and "EPSG:32629 100 m" in grid.zoom_reason
    assert grid.warnings == []
    presto = get_card("presto")
    assert input_grid(scene, presto, None).zoom == 11
    far = input_grid(scene, presto, 14)
    assert far.warnings and "11.5x" in far.warnings[0]
    with pytest.raises(ResamplingError, match="--strict") as e:
        input_grid(scene, presto, 14, strict=True)
    assert e.value.field == "zoom"
    # a model trained on pixels far from the scene's: warned, or refused when strict
    fine = card.model_copy(update={"gsd_m": 10.0})
    assert "trained on 10 m pixels" in input_grid(scene, fine, None).warnings[0]
    with pytest.raises(ResamplingError):
        input_grid(scene, fine, None, strict=True)


def test_a_batch_runs_each_window_once_and_tiles_agree(scene, card, model_store: Path) -> None:
    """Neighbours in one batch share their windows, and give what each gives alone: a tile's
    answer does not depend on its batch. (The card's windows at half overlap, to keep this quick.)"""
    from tilefm.models.base import load_tile_model

    half = card.model_copy(update={"context": card.context.model_copy(update={"overlap": 128})})
    model = load_tile_model(half, "onnxruntime", model_store / "ukis-csmask-6b-l2a" / "model.onnx", threads=1)
    t = TMS.tile(-11.45, 24.85, 12)
    pair = [Tile(t.x, t.y, 12), Tile(t.x + 1, t.y, 12)]
    inputs = read_native(scene, half, pair)
    together = model.run(inputs)
    alone = [model.run(read_native(scene, half, [tile]))[0] for tile in pair]
    assert len(model.native_stack(inputs)) < sum(len(model.native_stack([i])) for i in inputs)
    for a, b in zip(together, alone, strict=True):
        assert a.halo == 0 and a.values.shape == (3, 256, 256)
        assert (a.weight > 0).all()
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-6)
        probs = a.values / a.weight
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)  # blended probabilities
