"""tilefm's own resampler (tilefm.io.warp) against GDAL's warper and against exact bilinear
interpolation, on the real Sentinel-2 scene and the Copernicus DEM.

GDAL's warper is the reference for semantics (which pixels have a value, how nodata neighbours
count), exact interpolation at pyproj-transformed pixel centres the reference for values: GDAL
itself is within ~1 DN of it at tilefm's 0.001-px tolerance, tilefm's sampler within float32
arithmetic and its lattice's 0.001 px. Both give floats: neither rounds to the source's integers.
The one synthetic case is a nodata hole cut into real bands (the scene has none).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from tilefm.grid import TILE_SIZE, TMS, Tile, plan_tiles, tile_span
from tilefm.io.read import WARP_TOLERANCE, read_tile, read_tiles, rows
from tilefm.io.scene import Scene, open_scene
from tilefm.io.warp import LATTICE, GridSampler, SourceGrid, Strip
from tilefm.models import get_card


@pytest.fixture(scope="module")
def s2(scene_dir: Path) -> Scene:
    return open_scene({"s2": str(scene_dir)})


def _compare(auto: list, gdal: list) -> tuple[float, float, float]:
    """(share of pixels whose validity differs, share of both-valid values within 1, largest
    difference) over a batch."""
    flips = sum(int((a.valid != g.valid).sum()) for a, g in zip(auto, gdal, strict=True)) / sum(
        a.valid.size for a in auto
    )
    diffs = np.concatenate(
        [np.abs(a.data - g.data)[a.valid & g.valid] for a, g in zip(auto, gdal, strict=True)]
    )
    return flips, float((diffs <= 1).mean()), float(diffs.max())


@pytest.mark.parametrize(
    ("model", "zoom", "first", "count"),
    [
        ("vit-small", 13, 0, 60),
        ("vit-small", 13, 330, 26),
        ("ukis-csmask", 11, 0, 20),
        ("presto", 12, 40, 40),
    ],
    ids=["vit-z13-edge", "vit-z13-inner", "csmask-z11-halo96", "presto-z12"],
)
def test_reads_match_gdal(s2: Scene, model: str, zoom: int, first: int, count: int):
    """Same pixels valid, values within GDAL's own approximation error (measured: 99.7-100 %
    within 1 DN, at most 2.9 DN where the image is steepest)."""
    card = get_card(model)
    tiles = plan_tiles(s2.footprint, zoom).tiles[first : first + count]
    auto = read_tiles(s2, card, tiles, card.context.halo, warp="auto")
    gdal = read_tiles(s2, card, tiles, card.context.halo, warp="gdal")
    assert any(not a.valid.all() for a in auto) or first > 0  # the first rows meet the scene's edge
    flips, within1, worst = _compare(auto, gdal)
    # GDAL's approximate transformer moves the raster's outline by ~0.001 px: a few edge pixels
    assert flips < 1e-4, flips
    assert within1 > 0.985 and worst <= 4, (within1, worst)


def _exact_bilinear(path: str, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation (float64) at the pyproj-transformed centre of every pixel, and
    where all four neighbours are on the raster."""
    with rasterio.open(path) as src:
        arr = src.read(1).astype(np.float64)
        t, crs = src.transform, src.crs
    ox, oy, span = tile_span(tile.z)
    res = span / TILE_SIZE
    centres = (np.arange(TILE_SIZE) + 0.5) * res
    x, y = np.meshgrid(ox + tile.x * span + centres, oy - tile.y * span - centres)
    e, n = Transformer.from_crs("EPSG:3857", crs, always_xy=True).transform(x, y)
    col, row = (e - t.c) / t.a - 0.5, (n - t.f) / t.e - 0.5
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    ok = (c0 >= 0) & (r0 >= 0) & (c0 < arr.shape[1] - 1) & (r0 < arr.shape[0] - 1)
    c0, r0 = np.clip(c0, 0, arr.shape[1] - 2), np.clip(r0, 0, arr.shape[0] - 2)
    fc, fr = col - c0, row - r0
    v = (arr[r0, c0] * (1 - fc) * (1 - fr) + arr[r0, c0 + 1] * fc * (1 - fr)
         + arr[r0 + 1, c0] * (1 - fc) * fr + arr[r0 + 1, c0 + 1] * fc * fr)  # fmt: skip
    return v, ok


@pytest.mark.parametrize("band", ["B04", "B11"])  # 100 m and 200 m grids
def test_values_are_exact_bilinear(s2: Scene, band: str):
    """The exact value, within float32 and the lattice's 0.001 px (GDAL: up to ~1.2 DN off), not
    rounded to the source's integers."""
    card = get_card("vit-small")
    k = card.inputs[0].band_names.index(band)
    tiles = plan_tiles(s2.footprint, 13).tiles[330:333]
    for t, got in zip(tiles, read_tiles(s2, card, tiles, 0, warp="auto"), strict=True):
        exact, ok = _exact_bilinear(s2.modalities["s2"].bands[band].path, t)
        assert ok.all() and got.valid[k].all()
        d = np.abs(got.data[k] - exact)
        assert d.max() <= 0.02, d.max()  # measured: 0.0072 (B04), 0.0042 (B11)
        assert (got.data[k] != np.round(got.data[k])).mean() > 0.9  # not whole DN


def test_dem_float_values_exact(shared_dir: Path):
    """A float32 source in EPSG:4326 (the Copernicus DEM): no rounding, and the coordinates
    interpolated on the lattice are within 1e-3 px, so values are within 1e-3 m of exact
    interpolation here; GDAL agrees with it to its own tolerance."""
    dem = shared_dir / "data" / "copernicus-dem-N00-E006" / "dem.tif"
    scene = open_scene({"dem": str(dem)})
    card = get_card("presto")
    k = next(n for n in card.inputs if n.modality == "dem")
    centre = TMS.tile(6.5, 0.5, 14)  # ~9.5 m pixels over 30 m ones: upsampling
    tiles = [Tile(centre.x + k, centre.y, 14) for k in range(3)]
    names = [f"{i.modality}:{b.name}" for i in card.inputs for b in i.bands]
    idx = names.index(f"dem:{k.bands[0].name}")
    auto = read_tiles(scene, card, tiles, 0, warp="auto")
    gdal = read_tiles(scene, card, tiles, 0, warp="gdal")
    for t, a, g in zip(tiles, auto, gdal, strict=True):
        exact, ok = _exact_bilinear(str(dem), t)
        assert ok.all() and a.valid[idx].all()
        assert np.abs(a.data[idx] - exact).max() < 1e-3
        assert np.abs(a.data[idx] - g.data[idx]).max() < 0.05  # GDAL's 0.001-px approximation
        # the DEM's own halo (slopes) comes from the same sampling
        np.testing.assert_array_equal(a.extra[names[idx]][0][1:-1, 1:-1], a.data[idx])


def test_values_do_not_depend_on_the_batch(s2: Scene):
    """A tile's pixels are the same read alone or in a row of neighbours, with or without a halo
    (coordinates come from a lattice on the zoom's global pixel grid, not the strip's)."""
    for model, zoom in [("ukis-csmask", 11), ("vit-small", 13)]:
        card = get_card(model)
        tiles = plan_tiles(s2.footprint, zoom).tiles[20:26]
        assert any(len(r) > 1 for r in rows(tiles))
        for t, got in zip(tiles, read_tiles(s2, card, tiles, card.context.halo, warp="auto"), strict=True):
            alone = read_tile(s2, card, t, card.context.halo, warp="auto")
            np.testing.assert_array_equal(got.data, alone.data)
            np.testing.assert_array_equal(got.valid, alone.valid)


def test_downsampling_is_left_to_gdal(s2: Scene):
    """Where a destination pixel spans more than a source pixel GDAL widens its kernel and reads
    overviews: those groups go through GDAL, and give exactly what GDAL gives."""
    card = get_card("vit-small")
    tile = plan_tiles(s2.footprint, 9).tiles[0]  # ~270 m pixels: over the 100 m and the 200 m bands
    b02 = s2.modalities["s2"].bands["B02"]
    with rasterio.open(b02.path) as ds:
        sampler = GridSampler(SourceGrid.of(ds), Strip.of_row(tile.x, tile.y, 9, 1, 0))
    assert sampler.footprint() > 2 and not sampler.supports("bilinear")
    np.testing.assert_array_equal(
        read_tile(s2, card, tile, 0, "auto").data, read_tile(s2, card, tile, 0, "gdal").data
    )


def test_nodata_holes_follow_gdal(scene_dir: Path, tmp_path: Path):
    """A hole in all bands, a thin one in one band, one missing pixel: the pixels GDAL leaves
    without a value (those over an invalid source pixel) are the ones tilefm leaves without one,
    and their valid neighbours are renormalised as GDAL does."""
    for b in ["B02", "B03", "B04", "B08", "B11", "B12"]:
        with rasterio.open(scene_dir / f"{b}.tif") as src:
            profile, a = src.profile, src.read(1)
            f = 1 if src.res[0] == 100 else 2
        a[500 // f : 560 // f, 500 // f : 540 // f] = 0  # nodata = 0
        a[700 // f, 700 // f] = 0
        if b == "B03":
            a[600:603, 600:700] = 0
        with rasterio.open(tmp_path / f"{b}.tif", "w", **profile) as dst:
            dst.write(a, 1)
    shutil.copy(scene_dir / "stac-item.json", tmp_path)
    scene = open_scene({"s2": str(tmp_path)})
    card = get_card("ukis-csmask")
    tiles = [Tile(1917, 1756, 12), Tile(1918, 1757, 12), Tile(1919, 1757, 12), Tile(1919, 1758, 12)]
    auto = read_tiles(scene, card, tiles, 0, warp="auto")
    gdal = read_tiles(scene, card, tiles, 0, warp="gdal")
    holes = sum(int((~g.valid).sum()) for g in gdal)
    assert holes > 100_000
    for a, g in zip(auto, gdal, strict=True):
        np.testing.assert_array_equal(a.valid, g.valid)
        assert (a.data[~a.valid] == 0).all()
        d = np.abs(a.data - g.data)[a.valid]
        assert (d <= 1).mean() > 0.99 and d.max() <= 3


def test_nearest_matches_gdal(s2: Scene):
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    tile = plan_tiles(s2.footprint, 13).tiles[331]
    ox, oy, span = tile_span(13)
    path = s2.modalities["s2"].bands["B11"].path
    with rasterio.open(path) as ds:
        sampler = GridSampler(SourceGrid.of(ds), Strip.of_row(tile.x, tile.y, 13, 1, 0), WARP_TOLERANCE)
        ((values, valid),) = sampler.sample([(ds, 1)], "nearest", [slice(None)])
        transform = Affine(span / TILE_SIZE, 0, ox + tile.x * span, 0, -span / TILE_SIZE, oy - tile.y * span)
        with WarpedVRT(
            ds,
            crs="EPSG:3857",
            transform=transform,
            width=TILE_SIZE,
            height=TILE_SIZE,
            resampling=Resampling.nearest,
            tolerance=WARP_TOLERANCE,
        ) as vrt:
            ref = vrt.read(1)
    assert valid.all()
    # ties (a centre within GDAL's 0.001 px of a source pixel edge) may fall either way
    assert (values[0] == ref).mean() > 0.999


def test_lattice_refines_where_the_projection_bends():
    """Polar stereographic over a zoom-4 strip is far from affine over 16 pixels: the lattice
    step halves until interpolated centres are within the tolerance of exact ones."""
    from affine import Affine
    from rasterio.crs import CRS

    grid = SourceGrid(CRS.from_epsg(3413), Affine(10.0, 0, -3_000_000, 0, -10.0, 3_000_000), 600_000, 600_000)
    strip = Strip.of_row(4, 2, 4, 2, 8)
    sampler = GridSampler(grid, strip, tolerance=1e-3)
    assert sampler.lattice.step < LATTICE
    cols, rows_ = sampler.coords()
    ox, oy, span = tile_span(4)
    res = span / TILE_SIZE
    gc, gr = np.meshgrid(
        np.arange(strip.col0, strip.col0 + strip.width), np.arange(strip.row0, strip.row0 + strip.height)
    )
    e, n = Transformer.from_crs("EPSG:3857", "EPSG:3413", always_xy=True).transform(
        ox + (gc + 0.5) * res, oy - (gr + 0.5) * res
    )
    exact_c, exact_r = (np.asarray(e) + 3_000_000) / 10, (3_000_000 - np.asarray(n)) / 10
    assert np.abs(cols - exact_c).max() < 2e-3 and np.abs(rows_ - exact_r).max() < 2e-3


def test_gdal_everywhere_on_request(s2: Scene, monkeypatch: pytest.MonkeyPatch):
    """TILEFM_WARP=gdal sends every read through GDAL (the reads before this sampler)."""
    from tilefm.settings import get_settings

    card = get_card("vit-small")
    tile = plan_tiles(s2.footprint, 13).tiles[331]
    monkeypatch.setenv("TILEFM_WARP", "gdal")
    get_settings.cache_clear()
    try:
        via_settings = read_tile(s2, card, tile, 0)
    finally:
        monkeypatch.delenv("TILEFM_WARP")
        get_settings.cache_clear()
    np.testing.assert_array_equal(via_settings.data, read_tile(s2, card, tile, 0, "gdal").data)
    assert not np.array_equal(via_settings.data, read_tile(s2, card, tile, 0).data)


def test_float_nodata_nan_follows_gdal(shared_dir: Path, tmp_path: Path):
    """A float source whose nodata is NaN (a hole cut into the real DEM): no NaN leaks into the
    valid pixels around the hole, and the same pixels are valid as with GDAL; both paths put 0,
    not the NaN nodata, in the invalid pixels."""
    src_path = shared_dir / "data" / "copernicus-dem-N00-E006" / "dem.tif"
    with rasterio.open(src_path) as src:
        profile, a = src.profile, src.read(1)
    a[1700:1760, 1750:1800] = np.nan
    profile.update(nodata=float("nan"))
    with rasterio.open(tmp_path / "dem.tif", "w", **profile) as dst:
        dst.write(a, 1)
    scene = open_scene({"dem": str(tmp_path / "dem.tif")})
    card = get_card("presto")
    idx = [f"{i.modality}:{b.name}" for i in card.inputs for b in i.bands].index("dem:elevation")
    centre = TMS.tile(6.0 + 1775 / 3600, 1.0 - 1730 / 3600, 14)
    tiles = [Tile(centre.x + k, centre.y, 14) for k in (-1, 0, 1)]
    auto = read_tiles(scene, card, tiles, 0, warp="auto")
    gdal = read_tiles(scene, card, tiles, 0, warp="gdal")
    assert sum(int((~g.valid[idx]).sum()) for g in gdal) > 1000  # the hole is there
    for a_, g in zip(auto, gdal, strict=True):
        np.testing.assert_array_equal(a_.valid[idx], g.valid[idx])
        for t in (a_, g):
            assert np.isfinite(t.data[idx]).all() and (t.data[idx][~t.valid[idx]] == 0).all()
        both = a_.valid[idx]
        assert np.abs(a_.data[idx][both] - g.data[idx][both]).max() < 0.05
