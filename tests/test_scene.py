"""Scene inputs (tilefm.io.scene) and tile reads (tilefm.io.read) on the real Sentinel-2 scene and DEM.

Synthetic rasters (written into tmp_path) are used only where real data cannot show the case:
corrupt and non-georeferenced files.
"""

from __future__ import annotations

import json
import math
import os
from datetime import date
from pathlib import Path

import morecantile
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from shapely.geometry import box, shape

from tilefm.errors import MissingBandError, NotGeoreferencedError, SceneError
from tilefm.grid import TMS, Tile, plan_tiles, to_3857
from tilefm.io.read import WARP_TOLERANCE, TileInput, check_scene, read_band, read_tile
from tilefm.io.scene import Scene, open_modality, open_scene, parse_scene_arg
from tilefm.models import get_card

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B11", "B12", "B8A"]
#: STAC asset key -> band, for the 12 single-band COG assets of the real item
STAC_KEYS = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "swir16": "B11",
    "swir22": "B12",
}
ZOOM = 11
#: a tile well inside the scene at zoom 11, even with the ukis-csmask halo of 96 pixels
INNER = Tile(958, 877, ZOOM)


@pytest.fixture(scope="module")
def dem_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "copernicus-dem-N00-E006" / "dem.tif"


@pytest.fixture(scope="module")
def stac_item(scene_dir: Path) -> dict:
    return json.loads((scene_dir / "stac-item.json").read_text())


@pytest.fixture(scope="module")
def s2_scene(scene_dir: Path) -> Scene:
    return open_scene({"s2": str(scene_dir)})


@pytest.fixture(scope="module")
def csmask():
    return get_card("ukis-csmask")


@pytest.fixture(scope="module")
def presto():
    return get_card("presto")


def _xy_box(tile: Tile, halo: int = 0):
    b = TMS.xy_bounds(morecantile.Tile(tile.x, tile.y, tile.z))
    pad = halo * (b.right - b.left) / 256
    return box(b.left - pad, b.bottom - pad, b.right + pad, b.top + pad)


def _pixel_centres_3857(tile: Tile, halo: int) -> tuple[np.ndarray, np.ndarray]:
    b = TMS.xy_bounds(morecantile.Tile(tile.x, tile.y, tile.z))
    res = (b.right - b.left) / 256
    c = (np.arange(256 + 2 * halo) - halo + 0.5) * res
    return np.meshgrid(b.left + c, b.top - c)


# --------------------------------------------------------------------------------------------
# sources


def test_band_folder(scene_dir: Path, stac_item: dict):
    mod = open_modality("s2", str(scene_dir))
    # every raster of the folder, band files under canonical names; SCL and TCI by their stems
    assert sorted(mod.bands) == sorted(S2_BANDS + ["scl", "tci"])
    for name in S2_BANDS:
        band = mod.bands[name]
        assert Path(band.path) == scene_dir / f"{name}.tif"
        assert band.index == 1 and band.offset == 0.0  # baseline 02.14: no BOA offset
    # the date and processing metadata come from the stac-item.json beside the bands
    assert mod.datetime is not None and mod.datetime.date() == date(2020, 2, 19)
    assert mod.properties["s2:processing_baseline"] == "02.14"
    # the footprint is in lon/lat and is the STAC item's geometry (the full MGRS tile, no nodata)
    item_geom = shape(stac_item["geometry"])
    assert mod.footprint.geom_type == "Polygon"
    w, s, e, n = mod.footprint.bounds
    assert -12.1 < w < e < -10.7 and 24.2 < s < n < 25.4
    iou = mod.footprint.intersection(item_geom).area / mod.footprint.union(item_geom).area
    assert iou > 0.98, iou
    # the finest band is the 100 m one (B02/B03/B04/B08/TCI); B05 is 200 m, B01 600 m
    assert mod.resolution_m == 100.0
    scene = Scene({"s2": mod})
    assert scene.date == date(2020, 2, 19) and scene.resolution_m == 100.0
    assert scene.describe()["s2"]["bands"]["B8A"].endswith("B8A.tif#1")


def test_band_folder_date_override(s2_scene: Scene, scene_dir: Path):
    scene = open_scene({"s2": str(scene_dir)}, date_override=date(2021, 5, 1))
    assert scene.date == date(2021, 5, 1)
    assert s2_scene.date == date(2020, 2, 19)


def test_stac_item_resolves_local_files(scene_dir: Path, stac_item: dict):
    mod = open_modality("s2", str(scene_dir / "stac-item.json"))
    # the 12 single-band COG assets, keyed by eo:bands name; previews, SCL (no eo:bands), the
    # 3-band visual asset and the .jp2 duplicates are not model inputs
    assert sorted(mod.bands) == sorted(S2_BANDS)
    for name, band in mod.bands.items():
        # the hrefs point at https://sentinel-cogs...; the files of the same name beside the item win
        assert band.path == str(scene_dir / f"{name}.tif"), band.path
        assert band.index == 1 and band.offset == 0.0
    assert mod.datetime.date() == date(2020, 2, 19)
    assert mod.properties["earthsearch:boa_offset_applied"] is False
    assert mod.resolution_m == 100.0
    iou = (
        mod.footprint.intersection(shape(stac_item["geometry"])).area
        / mod.footprint.union(shape(stac_item["geometry"])).area
    )
    assert iou > 0.98


def test_stac_asset_map_wins(scene_dir: Path, tmp_path: Path):
    other = tmp_path / "red-elsewhere.tif"
    os.symlink(scene_dir / "B04.tif", other)
    mod = open_modality("s2", str(scene_dir / "stac-item.json"), asset_map={"red": str(other)})
    assert mod.bands["B04"].path == str(other)
    assert mod.bands["B03"].path == str(scene_dir / "B03.tif")  # the others still resolve beside the item


def _copy_item(stac_item: dict, tmp_path: Path, **props) -> Path:
    item = json.loads(json.dumps(stac_item))
    for k, v in props.items():
        if v is None:
            item["properties"].pop(k, None)
        else:
            item["properties"][k] = v
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))
    return path


def test_stac_baseline_4_offset(scene_dir: Path, stac_item: dict, tmp_path: Path):
    asset_map = {key: str(scene_dir / f"{band}.tif") for key, band in STAC_KEYS.items()}
    path = _copy_item(
        stac_item, tmp_path, **{"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": None}
    )
    mod = open_modality("s2", str(path), asset_map=asset_map)
    assert sorted(mod.bands) == sorted(S2_BANDS)
    for name, band in mod.bands.items():
        assert band.path == str(scene_dir / f"{name}.tif")
        assert band.offset == -1000.0, name
    # the offset is applied when the band is read
    raw, ok_raw = read_band(open_modality("s2", str(scene_dir)).bands["B04"], INNER, 0, "bilinear")
    shifted, ok = read_band(mod.bands["B04"], INNER, 0, "bilinear")
    assert ok.all() and (ok == ok_raw).all()
    np.testing.assert_array_equal(shifted, raw - 1000.0)

    # an item that says the offset was already removed keeps its values
    path = _copy_item(
        stac_item, tmp_path, **{"s2:processing_baseline": "05.09", "earthsearch:boa_offset_applied": True}
    )
    mod = open_modality("s2", str(path), asset_map=asset_map)
    assert all(b.offset == 0.0 for b in mod.bands.values())


def test_band_folder_baseline_4_offset(scene_dir: Path, stac_item: dict, tmp_path: Path):
    folder = tmp_path / "scene"
    folder.mkdir()
    for name in ("B02", "B04", "SCL"):
        os.symlink(scene_dir / f"{name}.tif", folder / f"{name}.tif")
    item = json.loads(json.dumps(stac_item))
    item["properties"]["s2:processing_baseline"] = "04.00"
    del item["properties"]["earthsearch:boa_offset_applied"]
    (folder / "stac-item.json").write_text(json.dumps(item))
    mod = open_modality("s2", str(folder))
    assert mod.bands["B02"].offset == mod.bands["B04"].offset == -1000.0
    assert mod.bands["scl"].offset == 0.0  # a class raster, not reflectance


@pytest.fixture(scope="module")
def stacked(scene_dir: Path, tmp_path_factory) -> Path:
    """B02, B03, B04 of the real scene in one 3-band GeoTIFF with band descriptions."""
    path = tmp_path_factory.mktemp("stack") / "rgb.tif"
    with rasterio.open(scene_dir / "B02.tif") as src:
        profile = src.profile
    profile.update(count=3, driver="GTiff", compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        for i, name in enumerate(("B02", "B03", "B04"), start=1):
            with rasterio.open(scene_dir / f"{name}.tif") as src:
                dst.write(src.read(1), i)
            dst.set_band_description(i, name)
    return path


def test_multiband_raster_by_description(stacked: Path, scene_dir: Path):
    mod = open_modality("s2", str(stacked))
    assert {k: (v.path, v.index) for k, v in mod.bands.items()} == {
        "B02": (str(stacked), 1),
        "B03": (str(stacked), 2),
        "B04": (str(stacked), 3),
    }
    assert mod.resolution_m == 100.0
    # band 2 of the stack reads exactly like B03.tif
    a, ok_a = read_band(mod.bands["B03"], INNER, 0, "bilinear")
    b, ok_b = read_band(open_modality("s2", str(scene_dir)).bands["B03"], INNER, 0, "bilinear")
    np.testing.assert_array_equal(a, b)
    assert ok_a.all() and ok_b.all()


def test_dem_single_band_is_elevation(dem_path: Path):
    mod = open_modality("dem", str(dem_path))
    assert list(mod.bands) == ["elevation"]
    assert mod.bands["elevation"].index == 1
    w, s, e, n = mod.footprint.bounds
    assert w == pytest.approx(6.0, abs=1e-3) and e == pytest.approx(7.0, abs=1e-3)
    assert s == pytest.approx(0.0, abs=1e-3) and n == pytest.approx(1.0, abs=1e-3)
    # 1 arc-second at ~0.5 N: about 30.9 m
    assert mod.resolution_m == pytest.approx(1 / 3600 * 111_320 * math.cos(math.radians(0.5)), rel=1e-3)
    # the same file under another modality name has no obvious band name
    assert list(open_modality("x", str(dem_path)).bands) == ["b1"]


# --------------------------------------------------------------------------------------------
# errors


def test_missing_path(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(SceneError, match="does not exist") as e:
        open_modality("s2", str(missing))
    assert str(missing) in str(e.value) and e.value.field == "scene.s2"
    with pytest.raises(SceneError, match="does not exist") as e:
        open_modality("s2", str(tmp_path / "item.json"))
    assert "item.json" in str(e.value)
    with pytest.raises(SceneError, match="no scene given"):
        open_scene({})


def test_folder_without_rasters(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("no rasters here")
    with pytest.raises(SceneError, match="holds no rasters") as e:
        open_modality("s2", str(tmp_path))
    assert str(tmp_path) in str(e.value) and e.value.field == "scene.s2"


def test_corrupt_tif(tmp_path: Path):
    bad = tmp_path / "B02.tif"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    # as a file
    with pytest.raises(SceneError, match="cannot read") as e:
        open_modality("s2", str(bad))
    assert str(bad) in str(e.value) and e.value.field == "scene.s2"
    # inside a band folder
    with pytest.raises(SceneError, match="cannot read") as e:
        open_modality("s2", str(tmp_path))
    assert str(bad) in str(e.value)
    assert type(e.value) is SceneError


def _write_plain(path: Path, **kw) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint16", **kw) as dst:
        dst.write(np.ones((1, 16, 16), np.uint16))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize(
    "kw",
    [
        {},  # no CRS, identity transform
        {"crs": "EPSG:32629"},  # CRS but no geotransform
        {"transform": Affine(100, 0, 200000, 0, -100, 2800000)},  # geotransform but no CRS
    ],
    ids=["nothing", "crs-only", "transform-only"],
)
def test_not_georeferenced(tmp_path: Path, kw):
    path = tmp_path / "B02.tif"
    _write_plain(path, **kw)
    with pytest.raises(NotGeoreferencedError, match="not georeferenced") as e:
        open_modality("s2", str(path))
    assert str(path) in str(e.value) and e.value.field == "scene.s2"
    with pytest.raises(NotGeoreferencedError):
        open_modality("s2", str(tmp_path))


def test_parse_scene_arg():
    assert parse_scene_arg("s2=./scene") == ("s2", "./scene")
    assert parse_scene_arg(" S2 = a=b.tif ") == ("s2", "a=b.tif")
    for arg in ("s2", "=x", "s2=", "s2=  "):
        with pytest.raises(SceneError, match="MODALITY=SOURCE") as e:
            parse_scene_arg(arg)
        assert repr(arg) in str(e.value) and e.value.field == "scene"
    with pytest.raises(SceneError, match="modality name 's 2'"):
        parse_scene_arg("S 2=x")
    with pytest.raises(SceneError, match="modality name"):
        parse_scene_arg("2s=x")


def test_check_scene_missing_band(scene_dir: Path, tmp_path: Path, csmask):
    for f in scene_dir.glob("*.tif"):
        if f.stem != "B11":
            os.symlink(f, tmp_path / f.name)
    scene = open_scene({"s2": str(tmp_path)})
    with pytest.raises(MissingBandError, match="B11") as e:
        check_scene(scene, csmask)
    msg = str(e.value)
    assert e.value.field == "scene.s2" and str(tmp_path) in msg and "B12" not in msg.split("missing")[0]
    # the complete scene passes
    check_scene(open_scene({"s2": str(scene_dir)}), csmask)


def test_check_scene_modalities(dem_path: Path, s2_scene: Scene, csmask, presto):
    dem_only = open_scene({"dem": str(dem_path)})
    check_scene(dem_only, presto)  # every presto input is optional
    check_scene(s2_scene, presto)
    with pytest.raises(SceneError, match="needs a 's2' modality") as e:
        check_scene(dem_only, csmask)
    assert e.value.field == "scene.s2"
    unknown = open_scene({"lidar": str(dem_path)})
    with pytest.raises(SceneError, match="none of the scene's modalities") as e:
        check_scene(unknown, presto)
    assert "lidar" in str(e.value)
    # a known modality without any of the model's bands is rejected too, even where optional
    with pytest.raises(MissingBandError, match="vv, vh missing") as e:
        check_scene(open_scene({"s1": str(dem_path)}), presto)
    assert e.value.field == "scene.s1"


# --------------------------------------------------------------------------------------------
# reads


#: the halo of a context model on the tile grid whose windows overlap by 192 pixels (the cloud
#: model's card runs on the scene's own grid, `tilefm.io.native`; tile-grid reads keep halos for others)
TILE_GRID_HALO = 96


def test_read_tile_inside(s2_scene: Scene, csmask):
    halo = TILE_GRID_HALO
    assert _xy_box(INNER, halo).within(to_3857(s2_scene.footprint))
    ti = read_tile(s2_scene, csmask, INNER, halo)
    assert ti.data.shape == ti.valid.shape == (6, 448, 448)
    assert ti.data.dtype == np.float32 and ti.size == 448
    assert ti.band_names == ["s2:B02", "s2:B03", "s2:B04", "s2:B08", "s2:B11", "s2:B12"]
    assert ti.valid.all()
    assert ti.date == date(2020, 2, 19)
    # bright desert, reflectance x 10000
    assert 500 < float(np.median(ti.data)) < 6000 and ti.data.max() < 12000
    # the halo read holds the tile itself: centre crop ~= the tile read alone
    alone = read_tile(s2_scene, csmask, INNER, 0)
    diff = np.abs(ti.data[:, halo:-halo, halo:-halo] - alone.data)
    assert (diff <= 1).mean() > 0.999 and diff.max() <= 10


def test_read_tile_at_edge(s2_scene: Scene, csmask):
    fp = to_3857(s2_scene.footprint)
    plan = plan_tiles(s2_scene.footprint, ZOOM)
    edge = [t for t in plan.tiles if 0.3 < _xy_box(t).intersection(fp).area / _xy_box(t).area < 0.7]
    assert edge
    tile, halo = edge[0], TILE_GRID_HALO
    ti = read_tile(s2_scene, csmask, tile, halo)
    assert ti.data.shape == (6, 448, 448)
    for band in ti.valid:
        assert band.any() and not band.all()
    # validity follows the raster's outline: valid well inside, invalid well outside
    res = 2 * math.pi * 6378137 / 2**ZOOM / 256
    x, y = _pixel_centres_3857(tile, halo)
    inside = shapely.contains_xy(fp.buffer(-3 * res), x, y)
    outside = ~shapely.contains_xy(fp.buffer(3 * res), x, y)
    assert inside.any() and outside.any()
    assert ti.valid[:, inside].all()
    assert not ti.valid[:, outside].any()
    assert (ti.data[~ti.valid] == 0).all()


def test_read_tile_outside_modality(s2_scene: Scene, dem_path: Path, scene_dir: Path, csmask, presto):
    # a tile over the DEM cell (Gulf of Guinea), far from the Sentinel-2 scene
    t = TMS.tile(6.5, 0.5, ZOOM)
    dem_tile = Tile(t.x, t.y, t.z)
    ti = read_tile(s2_scene, csmask, dem_tile, 96)
    assert ti.data.shape == (6, 448, 448)
    assert not ti.valid.any()

    # two modalities that do not overlap: each tile has one of them, the other is all invalid
    scene = open_scene({"s2": str(scene_dir), "dem": str(dem_path)})
    check_scene(scene, presto)
    names = read_tile(scene, presto, INNER, 0).band_names
    s2 = [i for i, n in enumerate(names) if n.startswith("s2:")]
    s1 = [i for i, n in enumerate(names) if n.startswith("s1:")]
    dem = names.index("dem:elevation")

    on_s2 = read_tile(scene, presto, INNER, 0)
    assert on_s2.valid[s2].all() and not on_s2.valid[s1].any() and not on_s2.valid[dem].any()
    assert (on_s2.data[s1] == 0).all() and (on_s2.data[dem] == 0).all()  # no file: zeros, not garbage
    assert on_s2.extra["dem:elevation"][0].shape == (258, 258)  # the DEM's own halo of 1
    assert not on_s2.extra["dem:elevation"][1].any()

    on_dem = read_tile(scene, presto, dem_tile, 0)
    assert not on_dem.valid[s2].any() and not on_dem.valid[s1].any()
    assert on_dem.valid[dem].any()
    values, ok = on_dem.extra["dem:elevation"]
    assert values.shape == ok.shape == (258, 258)
    np.testing.assert_array_equal(values[1:-1, 1:-1], on_dem.data[dem])


def _warped_vrt(path: Path, tile: Tile, **kw) -> np.ndarray:
    b = TMS.xy_bounds(morecantile.Tile(tile.x, tile.y, tile.z))
    transform = Affine((b.right - b.left) / 256, 0.0, b.left, 0.0, -(b.top - b.bottom) / 256, b.top)
    with (
        rasterio.open(path) as src,
        WarpedVRT(
            src,
            crs="EPSG:3857",
            transform=transform,
            width=256,
            height=256,
            resampling=Resampling.bilinear,
            **kw,
        ) as vrt,
    ):
        return vrt.read(1).astype(np.float64)


def _exact_bilinear(path: Path, tile: Tile) -> np.ndarray:
    """Bilinear interpolation at the exact (pyproj) position of every pixel centre: the truth that
    GDAL's warper approximates (upsampling 100 m -> ~69 m, so no kernel widening)."""
    with rasterio.open(path) as src:
        arr = src.read(1).astype(np.float64)
        t, crs = src.transform, src.crs
    x, y = _pixel_centres_3857(tile, 0)
    e, n = Transformer.from_crs("EPSG:3857", crs, always_xy=True).transform(x, y)
    col, row = (e - t.c) / t.a - 0.5, (n - t.f) / t.e - 0.5
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = col - c0, row - r0
    return (
        arr[r0, c0] * (1 - fc) * (1 - fr)
        + arr[r0, c0 + 1] * fc * (1 - fr)
        + arr[r0 + 1, c0] * (1 - fc) * fr
        + arr[r0 + 1, c0 + 1] * fc * fr
    )


@pytest.mark.parametrize("tile", [INNER, Tile(959, 878, ZOOM)], ids=str)
def test_read_values_match_independent_warp(s2_scene: Scene, scene_dir: Path, csmask, tile: Tile):
    """B04 from read_tile against independent reprojections of B04.tif onto the same tile.

    Measured on these tiles (|read_tile - reference| in DN, reflectance x 10000, values ~1500-4300):
    - WarpedVRT with tilefm's warp tolerance (0.001 px): identical (max 0);
    - WarpedVRT with GDAL's default tolerance (0.125 px): only ~74-85 % within 1 DN, max 13-39 DN
      (GDAL's approximate transformer, not tilefm, is off: it is 58-62 % within 1 DN of the exact
      values, max up to 41 DN);
    - exact bilinear at pyproj-transformed pixel centres: at 0.01 px 93-96 % within 1 DN (max 3-7
      DN); at tilefm's 0.001 px within about 1 DN everywhere.
    """
    b04 = read_tile(s2_scene, csmask, tile, 0).data[csmask.inputs[0].band_names.index("B04")]
    b04 = b04.astype(np.float64)
    path = scene_dir / "B04.tif"

    same = np.abs(b04 - _warped_vrt(path, tile, tolerance=WARP_TOLERANCE))
    assert (same <= 1).mean() >= 0.999, same.max()

    default = np.abs(b04 - _warped_vrt(path, tile))
    assert np.median(default) <= 1 and (default <= 1).mean() > 0.5 and default.max() < 60

    exact = np.abs(b04 - _exact_bilinear(path, tile))
    assert (exact <= 1).mean() > 0.99, (exact <= 1).mean()
    assert exact.max() < 2.5, exact.max()


@pytest.mark.parametrize("halo", [0, 96])
def test_lonlat_pixel_centres(halo: int):
    tile = INNER
    n = 256 + 2 * halo
    ti = TileInput(
        tile=tile,
        halo=halo,
        data=np.zeros((1, n, n), np.float32),
        valid=np.ones((1, n, n), bool),
        band_names=["x"],
    )
    lon, lat = ti.lonlat()
    assert lon.shape == lat.shape == (n, n)
    mt = morecantile.Tile(tile.x, tile.y, tile.z)
    bounds = TMS.bounds(mt)  # lon/lat
    xy = TMS.xy_bounds(mt)
    res = (xy.right - xy.left) / 256
    # the tile's own pixels start at index `halo`; their edges are the tile's bounds
    dlon = (bounds.right - bounds.left) / 256
    np.testing.assert_allclose(lon[0, halo], bounds.left + dlon / 2, atol=1e-9)
    np.testing.assert_allclose(lon[0, halo + 255], bounds.right - dlon / 2, atol=1e-9)
    np.testing.assert_allclose(np.diff(lon[0]), dlon, atol=1e-9)
    assert (lon == lon[:1]).all() and (lat == lat[:, :1]).all()
    # each row's latitude is the inverse mercator of its centre; the top edge is the tile's top
    ys = xy.top - (np.arange(n) - halo + 0.5) * res
    expected = np.array([TMS.lnglat(xy.left, y).y for y in ys])
    np.testing.assert_allclose(lat[:, 0], expected, atol=1e-9)
    assert np.all(np.diff(lat[:, 0]) < 0)
    top_edge = TMS.lnglat(xy.left, xy.top).y
    assert top_edge == pytest.approx(bounds.top, abs=1e-9)
    assert lat[halo, 0] < bounds.top and lat[halo + 255, 0] > bounds.bottom
    if halo:
        assert lat[halo - 1, 0] > bounds.top and lat[halo + 256, 0] < bounds.bottom


def test_row_reads_match_tile_reads(scene_dir: Path):
    """A batch read as one strip per band gives each tile what reading it alone gives (within
    the warper's 1-DN tolerance), with the same validity; tiles with no halo are read alone."""
    from tilefm.grid import plan_tiles
    from tilefm.io.read import read_tiles, rows
    from tilefm.io.scene import open_scene
    from tilefm.models import get_card

    scene = open_scene({"s2": str(scene_dir)})
    card = get_card("ukis-csmask")
    plan = plan_tiles(scene.footprint, 11)
    batch = plan.tiles[20:25]
    assert [len(r) for r in rows(batch)] and sum(len(r) for r in rows(batch)) == len(batch)
    strip = read_tiles(scene, card, batch, 96)
    for t, got in zip(batch, strip, strict=True):
        alone = read_tile(scene, card, t, 96)
        assert got.tile == t and got.data.shape == alone.data.shape == (6, 448, 448)
        assert (got.valid == alone.valid).all()
        assert np.abs(got.data - alone.data).max() <= 1.0
    exact = read_tiles(scene, get_card("presto"), batch, 0)
    for t, got in zip(batch, exact, strict=True):
        assert (got.data == read_tile(scene, get_card("presto"), t, 0).data).all()


def test_reading_leaves_gdal_block_cache_alone(s2_scene: Scene) -> None:
    """Reads in threads (the local executor, the tiler) must not shrink the process-wide GDAL
    block cache: a tiny one made the 384-band COG step re-decompress every block (minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from rasterio._env import get_gdal_config

    before = int(get_gdal_config("GDAL_CACHEMAX"))
    card = get_card("vit-small")
    tiles = plan_tiles(s2_scene.footprint, 10).tiles[:4]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda t: read_tile(s2_scene, card, t, 0), tiles))
    assert int(get_gdal_config("GDAL_CACHEMAX")) == before >= 64 << 20
