"""Bands by what they are, from any sensor (tilefm.io.bands, tilefm.io.scene): STAC items by common
name with `raster:bands` scaling, Landsat Collection 2 Level-2 and HLS by their own band names,
`--band`, and the model cards' alternatives.

Every input is made from the sample Sentinel-2 scene's own pixels, in tmp dirs. The "twin" is the
scene rewritten as Landsat Collection 2 Level-2 writes surface reflectance, DN = (reflectance +
0.2) / 2.75e-5, behind a STAC item whose `raster:bands` say so: read back it must match the native
scene to within that quantisation (0.275 in the cards' reflectance x 10000 units; resampled values
are not rounded to whole DN, so nothing else separates them).
"""

from __future__ import annotations

import json
import os
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli

from tilefm.errors import MissingBandError, SceneError
from tilefm.grid import Tile
from tilefm.io.bands import BANDS, HLS_L30, LANDSAT_L2, band_by_wavelength, bind_card, sensor_of_file
from tilefm.io.read import check_scene, read_band, read_tiles
from tilefm.io.scene import (
    BandFile,
    Scene,
    date_in_name,
    open_modality,
    open_scene,
    parse_band_arg,
    with_bands,
)
from tilefm.models import get_card
from tilefm.models.presto_tiles import PrestoInputs

ZOOM = 11
#: a row of two tiles well inside the scene, and one on its edge
TILES = [Tile(958, 877, ZOOM), Tile(959, 877, ZOOM), Tile(958, 881, ZOOM)]
#: common name -> the sample scene's file
COMMON = {
    "coastal": "B01", "blue": "B02", "green": "B03", "red": "B04", "rededge1": "B05", "rededge2": "B06",
    "rededge3": "B07", "nir": "B08", "nir08": "B8A", "nir09": "B09", "swir16": "B11", "swir22": "B12",
}  # fmt: skip
#: Landsat 8/9 OLI surface reflectance bands -> the sample scene's equivalent
OLI_SR = {
    "SR_B1": "B01",
    "SR_B2": "B02",
    "SR_B3": "B03",
    "SR_B4": "B04",
    "SR_B5": "B8A",
    "SR_B6": "B11",
    "SR_B7": "B12",
}
OLI_COMMON = {
    "SR_B1": "coastal",
    "SR_B2": "blue",
    "SR_B3": "green",
    "SR_B4": "red",
    "SR_B5": "nir08",
    "SR_B6": "swir16",
    "SR_B7": "swir22",
}
L2_SCALE, L2_OFFSET = 2.75e-05, -0.2
#: the twin's quantisation (0.275 / 2), and float32 arithmetic
READ_TOLERANCE = 0.1375 + 0.01
LANDSAT_ID = "LC09_L2SP_203043_20200219_20200220_02_T1"


def _landsat_dn(s2_dn: np.ndarray) -> np.ndarray:
    """Sentinel-2 L2A integers (reflectance x 10000) as Landsat C2 L2 SR integers; 0 stays nodata."""
    dn = np.round((s2_dn.astype(np.float64) / 10000.0 - L2_OFFSET) / L2_SCALE)
    return np.where(s2_dn == 0, 0, np.clip(dn, 1, 65535)).astype(np.uint16)


def _write_landsat(src_path: Path, dst_path: Path, *, nodata: float | None = 0) -> None:
    with rasterio.open(src_path) as src:
        profile, data = src.profile, src.read(1)
    profile.update(driver="GTiff", nodata=nodata)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(_landsat_dn(data), 1)


def _asset(
    href: str,
    *,
    common: str | None = None,
    name: str | None = None,
    wavelength: float | None = None,
    raster: dict | None = None,
) -> dict:
    asset: dict = {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "roles": ["data"],
    }
    if common or name:
        band = {
            k: v
            for k, v in (("name", name or common), ("common_name", common), ("center_wavelength", wavelength))
            if v is not None
        }
        asset["eo:bands"] = [band]
    if raster is not None:
        asset["raster:bands"] = [raster]
    return asset


def _item(item_id: str, assets: dict, stac_item: dict, **props) -> dict:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "geometry": stac_item["geometry"], "bbox": stac_item["bbox"],
        "properties": {"datetime": stac_item["properties"]["datetime"], **props},
        "links": [], "assets": assets,
    }  # fmt: skip


@pytest.fixture(scope="module")
def stac_item(scene_dir: Path) -> dict:
    return json.loads((scene_dir / "stac-item.json").read_text())


@pytest.fixture(scope="module")
def native(scene_dir: Path) -> Scene:
    return open_scene({"s2": str(scene_dir)})


@pytest.fixture(scope="module")
def twin(scene_dir: Path, stac_item: dict, tmp_path_factory) -> Path:
    """The sample scene as a STAC 1.0 item with common-name assets, its files in Landsat C2 L2
    scaling and its `raster:bands` saying so (and no sensor: a generic item)."""
    folder = tmp_path_factory.mktemp("twin")
    assets = {}
    for common, band in COMMON.items():
        _write_landsat(scene_dir / f"{band}.tif", folder / f"{common}.tif")
        raster = {"nodata": 0, "data_type": "uint16", "scale": L2_SCALE, "offset": L2_OFFSET}
        assets[common] = _asset(
            f"./{common}.tif", common=common, wavelength=BANDS[band].wavelength_um, raster=raster
        )
    assets["thumbnail"] = {"href": "./thumb.jpg", "type": "image/jpeg", "roles": ["thumbnail"]}
    path = folder / "item.json"
    path.write_text(json.dumps(_item("twin", assets, stac_item)))
    return path


@pytest.fixture(scope="module")
def landsat_files(scene_dir: Path, tmp_path_factory) -> Path:
    """A USGS Landsat 9 Collection 2 Level-2 delivery: LC09_L2SP_..._SR_B1..7.TIF."""
    folder = tmp_path_factory.mktemp("landsat") / LANDSAT_ID
    folder.mkdir()
    for sr, band in OLI_SR.items():
        _write_landsat(scene_dir / f"{band}.tif", folder / f"{LANDSAT_ID}_{sr}.TIF")
    return folder


def _read(
    scene: Scene, card_name: str, tiles: list[Tile] = TILES
) -> tuple[list[str], np.ndarray, np.ndarray]:
    card = get_card(card_name)
    inputs = read_tiles(scene, card, tiles, card.context.halo)
    return inputs[0].band_names, np.stack([t.data for t in inputs]), np.stack([t.valid for t in inputs])


# --------------------------------------------------------------------------------------------
# units


def test_to_units_is_bit_for_bit_without_scaling():
    values = np.array([[1.0, 2.5], [7000.0, 0.0]], np.float32)
    before = values.copy()
    out = BandFile("B04", "x.tif").to_units(values)
    assert out is values and np.array_equal(values.view(np.uint32), before.view(np.uint32))
    BandFile("B04", "x.tif", offset=-1000.0).to_units(values)
    np.testing.assert_array_equal(values, before - 1000)
    values = before.copy()
    BandFile("B04", "x.tif", offset=-2000.0, scale=0.275).to_units(values)
    np.testing.assert_array_equal(values, before * np.float32(0.275) + np.float32(-2000))


def test_sample_item_reads_as_before(scene_dir: Path, native: Scene):
    """The Earth Search item says scale 0.0001, offset 0: exactly the cards' units."""
    mod = open_modality("s2", str(scene_dir / "stac-item.json"))
    assert mod.sensor == "sentinel-2" and native.modalities["s2"].sensor == "sentinel-2"
    for name, band in mod.bands.items():
        assert (band.scale, band.offset, band.nodata) == (1.0, 0.0, 0.0), name
        assert band.path == str(scene_dir / f"{name}.tif")
    a, ok_a = read_band(mod.bands["B04"], TILES[0], 0, "bilinear")
    b, ok_b = read_band(native.modalities["s2"].bands["B04"], TILES[0], 0, "bilinear")
    assert np.array_equal(a, b) and np.array_equal(ok_a, ok_b)


def test_baseline_offset_wins_over_raster_bands_offset(scene_dir: Path, stac_item: dict, tmp_path: Path):
    """Earth Search stamps offset -0.1 on baseline >= 04.00 items whether or not the offset was
    already taken off the COGs; `earthsearch:boa_offset_applied` and the baseline decide."""
    item = json.loads(json.dumps(stac_item))
    for asset in item["assets"].values():
        for r in asset.get("raster:bands", []):
            if r.get("scale") == 0.0001:
                r["offset"] = -0.1
    for applied, expected in ((False, -1000.0), (True, 0.0)):
        item["properties"].update(
            {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": applied}
        )
        (tmp_path / "item.json").write_text(json.dumps(item))
        for f in scene_dir.glob("B*.tif"):
            if not (tmp_path / f.name).exists():
                os.symlink(f, tmp_path / f.name)
        mod = open_modality("s2", str(tmp_path / "item.json"))
        assert {(b.scale, b.offset) for b in mod.bands.values()} == {(1.0, expected)}


# --------------------------------------------------------------------------------------------
# (i) the twin: common names + raster:bands scale/offset


def test_twin_resolves_like_the_native_scene(twin: Path, native: Scene):
    mod = open_modality("s2", str(twin))
    assert sorted(mod.bands) == sorted(native.modalities["s2"].bands.keys() - {"scl", "tci"})
    assert mod.sensor is None  # no platform: bands by common name, units by raster:bands
    for name, band in mod.bands.items():
        assert (band.scale, band.offset, band.nodata) == (0.275, -2000.0, 0.0), name
        assert Path(band.path).name == f"{BANDS[name].common_name}.tif"


@pytest.mark.parametrize("card", ["ukis-csmask", "presto"])
def test_twin_reads_match_the_native_scene(twin: Path, native: Scene, card: str):
    names, data, valid = _read(open_scene({"s2": str(twin)}), card)
    names_n, data_n, valid_n = _read(native, card)
    assert names == names_n
    s2 = [i for i, n in enumerate(names) if n.startswith("s2:")]
    assert np.array_equal(valid[:, s2], valid_n[:, s2])
    assert valid[:, s2].any() and not valid[:, s2].all()  # the edge tile
    ok = valid_n[:, s2]
    diff = np.abs(data[:, s2] - data_n[:, s2])[ok]
    assert diff.max() <= READ_TOLERANCE, diff.max()
    assert diff.mean() < 0.35, diff.mean()  # ~0.25: the native read's own rounding to whole DN


def test_declared_nodata_is_applied_where_the_file_has_none(scene_dir: Path, stac_item: dict, tmp_path: Path):
    with rasterio.open(scene_dir / "B04.tif") as src:
        profile, data = src.profile, src.read(1)
    data[:100, :] = 0  # the scene's northern strip has no data
    for name, nodata in (("red.tif", None), ("red-nodata.tif", 0)):
        with rasterio.open(tmp_path / name, "w", **{**profile, "nodata": nodata}) as dst:
            dst.write(data, 1)
    raster = {"nodata": 0, "scale": 0.0001, "offset": 0}
    item = _item("red-only", {"red": _asset("./red.tif", common="red", raster=raster)}, stac_item)
    (tmp_path / "item.json").write_text(json.dumps(item))
    band = open_modality("s2", str(tmp_path / "item.json")).bands["B04"]
    assert band.path.startswith("vrt://") and band.nodata == 0.0
    tile = Tile(959, 875, ZOOM)  # across the scene's northern edge and the strip
    values, ok = read_band(band, tile, 0, "bilinear")
    # as if the file said it: the strip is no data, and bilinear weights skip it
    expected, ok_expected = read_band(BandFile("B04", str(tmp_path / "red-nodata.tif")), tile, 0, "bilinear")
    np.testing.assert_array_equal(ok, ok_expected)
    np.testing.assert_array_equal(values, expected)
    # the file alone: every pixel inside the scene is valid, the strip's zeros mixed in
    _, ok_plain = read_band(BandFile("B04", str(tmp_path / "red.tif")), tile, 0, "bilinear")
    assert ok.any() and not (ok & ~ok_plain).any() and (ok_plain & ~ok).mean() > 0.3


# --------------------------------------------------------------------------------------------
# (ii) Landsat 8/9 Collection 2 Level-2


def _landsat_item(folder: Path, stac_item: dict, *, usgs: bool) -> Path:
    """Planetary Computer / Earth Search layout (common-name keys, raster:bands), or USGS's own
    names (SR_B2 keys, no band metadata: the sensor's table gives the scaling)."""
    assets = {}
    for sr in OLI_SR:
        href = f"./{LANDSAT_ID}_{sr}.TIF"
        if usgs:
            assets[sr] = {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
        else:
            raster = {
                "nodata": 0,
                "data_type": "uint16",
                "scale": L2_SCALE,
                "offset": L2_OFFSET,
                "unit": "none",
            }
            assets[OLI_COMMON[sr]] = _asset(href, common=OLI_COMMON[sr], name=sr, raster=raster)
    for qa in ("qa_pixel", "qa_aerosol"):
        assets[qa] = {
            "href": f"./{LANDSAT_ID}_{qa.upper()}.TIF",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        }
    props = {"platform": "landsat-9", "instruments": ["oli", "tirs"], "landsat:correction": "L2SP"}
    path = folder / f"{'usgs' if usgs else 'pc'}-item.json"
    path.write_text(json.dumps(_item(LANDSAT_ID, assets, stac_item, **props)))
    return path


@pytest.fixture(scope="module", params=["folder", "usgs-item", "pc-item"])
def landsat(request, landsat_files: Path, stac_item: dict) -> Scene:
    if request.param == "folder":
        return open_scene({"s2": str(landsat_files)})
    return open_scene({"s2": str(_landsat_item(landsat_files, stac_item, usgs=request.param == "usgs-item"))})


def test_landsat_resolves(landsat: Scene):
    mod = landsat.modalities["s2"]
    assert mod.sensor == "landsat-c2-l2"
    assert sorted(mod.bands) == ["B01", "B02", "B03", "B04", "B11", "B12", "B8A"]
    for name, band in mod.bands.items():
        assert (band.scale, band.offset) == (0.275, -2000.0), name
    assert Path(mod.bands["B8A"].path).name.endswith("_SR_B5.TIF")  # OLI band 5: the narrow NIR


def test_landsat_cloud_mask_reads_oli_nir(landsat: Scene, native: Scene):
    """ukis-csmask takes either NIR (its card's alternatives): Landsat's band 5 goes in as B08."""
    card = get_card("ukis-csmask")
    with pytest.raises(MissingBandError, match="B08"):
        check_scene(landsat, card)  # as opened: Landsat has no broad NIR
    bound = bind_card(landsat, card)
    check_scene(bound, card)
    assert bound.modalities["s2"].bands["B08"] == landsat.modalities["s2"].bands["B8A"]
    assert "B08" not in landsat.modalities["s2"].bands  # the opened scene is left as it is
    names, data, valid = _read(bound, "ukis-csmask", TILES[:1])
    _, data_n, _ = _read(native, "ukis-csmask", TILES[:1])
    assert valid.all()
    presto_names, presto_n, _ = _read(native, "presto", TILES[:1])
    expected = presto_n[0, presto_names.index("s2:B8A")]
    assert np.abs(data[0, names.index("s2:B08")] - expected).max() <= READ_TOLERANCE
    others = [i for i, n in enumerate(names) if n != "s2:B08"]
    assert np.abs(data[:, others] - data_n[:, others]).max() <= READ_TOLERANCE


def test_landsat_presto_masks_what_landsat_lacks(landsat: Scene):
    card = get_card("presto")
    scene = bind_card(landsat, card)
    check_scene(scene, card)
    assert "B08" not in scene.modalities["s2"].bands  # Presto has its own B8A: nothing stands in
    names, data, valid = _read(scene, "presto", TILES[:1])
    lacking = {"s2:B05", "s2:B06", "s2:B07", "s2:B08"}
    for i, n in enumerate(names):
        if n in lacking or not n.startswith("s2:"):
            assert not valid[0, i].any() and (data[0, i] == 0).all(), n
        else:
            assert valid[0, i].all(), n
    inputs = read_tiles(scene, card, TILES[:1], 0)
    raw, present, _, pix_valid = PrestoInputs(card).pixels(inputs[0])
    assert pix_valid.all() and present.sum(-1).max() == 6  # B2 B3 B4 B8A B11 B12


def test_landsat_missing_band_names_the_sensor(landsat_files: Path, tmp_path: Path):
    for f in landsat_files.iterdir():
        if not f.name.endswith("_SR_B5.TIF"):
            os.symlink(f, tmp_path / f.name)
    scene = open_scene({"s2": str(tmp_path)})
    with pytest.raises(
        MissingBandError, match=r"B08 \(nir, 0.842 um\).*Landsat 8/9 OLI/TIRS Collection 2 Level-2"
    ) as e:
        bind_card(scene, get_card("ukis-csmask"))
    assert e.value.field == "scene.s2"


def test_a_file_missing_from_a_folder_is_not_the_sensors_fault(scene_dir: Path, tmp_path: Path):
    for f in scene_dir.iterdir():
        if f.name != "B11.tif":
            os.symlink(f, tmp_path / f.name)
    card = get_card("ukis-csmask")
    scene = bind_card(open_scene({"s2": str(tmp_path)}), card)  # Sentinel-2 measures B11
    with pytest.raises(MissingBandError, match="B11 missing from"):
        check_scene(scene, card)


def test_sensor_names_win_over_broad_common_names(landsat_files: Path, stac_item: dict):
    """Older Landsat items call OLI's band 5 `nir`: its own name (B5) says it is the narrow NIR."""
    assets = {
        sr: _asset(
            f"./{LANDSAT_ID}_{sr}.TIF",
            name=sr.replace("SR_", ""),
            common="nir" if sr == "SR_B5" else OLI_COMMON[sr],
        )
        for sr in OLI_SR
    }
    path = landsat_files / "old-item.json"
    path.write_text(
        json.dumps(_item(LANDSAT_ID, assets, stac_item, platform="LANDSAT_8", instruments=["OLI_TIRS"]))
    )
    mod = open_modality("s2", str(path))
    assert mod.sensor == "landsat-c2-l2" and sorted(mod.bands) == [
        "B01",
        "B02",
        "B03",
        "B04",
        "B11",
        "B12",
        "B8A",
    ]


def test_landsat_file_as_a_single_raster(landsat_files: Path):
    mod = open_modality("s2", str(landsat_files / f"{LANDSAT_ID}_SR_B4.TIF"))
    assert list(mod.bands) == ["B04"] and mod.sensor == "landsat-c2-l2"
    assert (mod.bands["B04"].scale, mod.bands["B04"].offset) == (0.275, -2000.0)


# --------------------------------------------------------------------------------------------
# (iii) HLS S30 / L30, Sentinel-2 L1C, Sentinel-1


def _symlinks(scene_dir: Path, folder: Path, names: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for new, band in names.items():
        os.symlink(scene_dir / f"{band}.tif", folder / new)
    return folder


#: the sample scene's twelve bands, which HLS S30 and Sentinel-2 L1C measure too
S2_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
HLS_S30_STEM = "HLS.S30.T29RKH.2020050T112111.v2.0"
HLS_L30_STEM = "HLS.L30.T29RKH.2020050T112111.v2.0"
#: HLS L30 keeps Landsat's band numbers -> the sample scene's equivalent
HLS_L30_NUMBERS = {
    "B01": "B01",
    "B02": "B02",
    "B03": "B03",
    "B04": "B04",
    "B05": "B8A",
    "B06": "B11",
    "B07": "B12",
}
#: an L1C granule's band ids (B10, cirrus, stood in for by the sample's B09)
L1C_IDS = (*S2_IDS[:10], "B10", *S2_IDS[10:])
L1C_STEM = "T29RKH_20200219T112111"


def _hls_s30(scene_dir: Path, parent: Path) -> Path:
    """An HLS S30 granule folder: HLS.S30...v2.0.B01.tif ... (the sample's files, unchanged)."""
    return _symlinks(scene_dir, parent / HLS_S30_STEM, {f"{HLS_S30_STEM}.{b}.tif": b for b in S2_IDS})


def _hls_l30(scene_dir: Path, stac_item: dict, parent: Path) -> Path:
    """An HLS L30 granule folder (HLS.L30...v2.0.B05.tif is the NIR) with `item.json`, an item
    whose assets are keyed by those numbers with no band metadata (as LP DAAC's)."""
    stem = HLS_L30_STEM
    folder = _symlinks(scene_dir, parent / stem, {f"{stem}.{n}.tif": b for n, b in HLS_L30_NUMBERS.items()})
    assets = {
        n: {"href": f"./{stem}.{n}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
        for n in HLS_L30_NUMBERS
    }
    assets["Fmask"] = {
        "href": f"./{stem}.Fmask.tif",
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
    }
    (folder / "item.json").write_text(json.dumps(_item(stem, assets, stac_item, platform="landsat-8")))
    return folder


def _s2_l1c(scene_dir: Path, stac_item: dict, folder: Path, *, baseline: str, dn_offset: int = 0) -> Path:
    """A Sentinel-2 L1C granule folder (T29RKH_..._B01.tif: a .SAFE's image names) with
    `item.json`, keyed by band ids, at processing `baseline`. The sample's files as they are, or,
    with `dn_offset`, rewritten as baseline >= 04.00 writes them: DN + 1000, 0 staying no data."""
    files = {f"{L1C_STEM}_{b}.tif": ("B09" if b == "B10" else b) for b in L1C_IDS}
    if dn_offset:
        folder.mkdir(parents=True)
        for name, band in files.items():
            with rasterio.open(scene_dir / f"{band}.tif") as src:
                profile, data = src.profile, src.read(1)
            shifted = np.where(data == 0, 0, data.astype(np.int64) + dn_offset)
            with rasterio.open(folder / name, "w", **profile) as dst:
                dst.write(shifted.astype(np.uint16), 1)
    else:
        _symlinks(scene_dir, folder, files)
    assets = {b: _asset(f"./{L1C_STEM}_{b}.tif", name=b) for b in L1C_IDS}
    item = _item(
        "S2A_MSIL1C_20200219",
        assets,
        stac_item,
        platform="sentinel-2a",
        **{"s2:product_type": "S2MSI1C", "s2:processing_baseline": baseline},
    )
    (folder / "item.json").write_text(json.dumps(item))
    return folder / "item.json"


def test_hls_s30_folder(scene_dir: Path, tmp_path: Path, native: Scene):
    folder = _hls_s30(scene_dir, tmp_path)
    mod = open_modality("s2", str(folder))
    assert mod.sensor == "hls-s30" and sorted(mod.bands) == sorted(S2_IDS)
    assert all((b.scale, b.offset) == (1.0, 0.0) for b in mod.bands.values())
    check_scene(bind_card(Scene({"s2": mod}), get_card("ukis-csmask")), get_card("ukis-csmask"))


def test_hls_granules_have_their_dates(scene_dir: Path, tmp_path: Path):
    """HLS names carry year and day of year (2020050 = 19 February): a granule folder and a
    granule's file are dated by them, as a Landsat folder is by its YYYYMMDD."""
    folder = _hls_s30(scene_dir, tmp_path)
    assert open_scene({"s2": str(folder)}).date == date(2020, 2, 19)
    one = next(folder.glob("*.B04.tif"))
    assert open_scene({"s2": str(one)}).date == date(2020, 2, 19)
    assert date_in_name("HLS.L30.T29RKH.2020366T112111.v2.0") == datetime(2020, 12, 31)  # a leap year
    assert date_in_name("HLS.L30.T29RKH.2021366T112111.v2.0") is None
    assert date_in_name("S2A_MSIL2A_20200219T112111_N0214_R037") == datetime(2020, 2, 19)


def test_hls_l30_folder_and_item(scene_dir: Path, stac_item: dict, tmp_path: Path):
    """HLS L30 keeps Landsat's band numbers: its B05 is the NIR (B8A), B06/B07 the SWIRs."""
    stem = HLS_L30_STEM
    folder = _hls_l30(scene_dir, stac_item, tmp_path)
    mod = open_modality("s2", str(folder))
    assert mod.sensor == "hls-l30"
    assert {k: Path(v.path).name for k, v in mod.bands.items()} == {
        b: f"{stem}.{n}.tif" for n, b in HLS_L30_NUMBERS.items()
    }
    # the same as an item whose assets are keyed by those numbers, with no band metadata
    item = open_modality("s2", str(folder / "item.json"))
    assert item.sensor == "hls-l30" and {k: v.path for k, v in item.bands.items()} == {
        k: v.path for k, v in mod.bands.items()
    }
    card = get_card("ukis-csmask")
    bound = bind_card(Scene({"s2": item}), card)
    check_scene(bound, card)
    # values as Sentinel-2's: HLS reflectance is x 10000 already
    a, _ = read_band(bound.modalities["s2"].bands["B08"], TILES[0], 0, "bilinear")
    b, _ = read_band(BandFile("B8A", str(scene_dir / "B8A.tif")), TILES[0], 0, "bilinear")
    assert np.array_equal(a, b)


def test_s2_l1c_item_and_safe_names(scene_dir: Path, stac_item: dict, tmp_path: Path):
    """An L1C item keyed by band ids (B10 cirrus included), baseline 04.00: offset -1000; a
    .SAFE's granule image names resolve too."""
    item = _s2_l1c(scene_dir, stac_item, tmp_path / "granule", baseline="04.00")
    safe = open_modality("s2", str(item.parent))
    assert sorted(safe.bands) == sorted(L1C_IDS) and safe.sensor == "sentinel-2"
    l1c = open_modality("s2", str(item))
    assert sorted(l1c.bands) == sorted(L1C_IDS)
    assert all((b.scale, b.offset) == (1.0, -1000.0) for b in l1c.bands.values())


def test_sentinel1_grd_names(scene_dir: Path, tmp_path: Path):
    folder = _symlinks(scene_dir, tmp_path / "s1", {
        "s1a-iw-grd-vv-20200219t183936-20200219t184001-031347-039b0e-001.tiff": "B04",
        "s1a-iw-grd-vh-20200219t183936-20200219t184001-031347-039b0e-002.tiff": "B03",
    })  # fmt: skip
    mod = open_modality("s1", str(folder))
    assert sorted(mod.bands) == ["vh", "vv"] and mod.sensor == "sentinel-1"


def test_sensor_tables():
    assert sensor_of_file(f"{LANDSAT_ID}_SR_B5") == (LANDSAT_L2, "B8A")
    assert sensor_of_file(f"{LANDSAT_ID}_QA_PIXEL") is None
    assert sensor_of_file("HLS.L30.T29RKH.2020050T112111.v2.0.B09") == (HLS_L30, "B10")  # cirrus
    assert sensor_of_file("B04") is None
    assert (
        band_by_wavelength(0.865) == "B8A"
        and band_by_wavelength(0.655) == "B04"
        and band_by_wavelength(3.0) is None
    )


def test_stac_11_bands_and_wavelengths(scene_dir: Path, stac_item: dict, tmp_path: Path):
    """STAC 1.1 `bands` with eo:/raster: fields; a band known only by its centre wavelength."""
    os.symlink(scene_dir / "B04.tif", tmp_path / "a.tif")
    os.symlink(scene_dir / "B8A.tif", tmp_path / "b.tif")
    assets = {
        "a": {
            "href": "./a.tif",
            "type": "image/tiff",
            "bands": [
                {
                    "name": "x",
                    "eo:common_name": "red",
                    "nodata": 0,
                    "raster:scale": 0.0001,
                    "raster:offset": -0.1,
                }
            ],
        },
        "b": {
            "href": "./b.tif",
            "type": "image/tiff",
            "bands": [{"name": "y", "eo:center_wavelength": 0.86}],
        },
    }
    item = _item("stac-1.1", assets, stac_item)
    item["stac_version"] = "1.1.0"
    (tmp_path / "item.json").write_text(json.dumps(item))
    mod = open_modality("s2", str(tmp_path / "item.json"))
    assert sorted(mod.bands) == ["B04", "B8A"]
    assert (mod.bands["B04"].scale, mod.bands["B04"].offset, mod.bands["B04"].nodata) == (1.0, -1000.0, 0.0)
    assert (mod.bands["B8A"].scale, mod.bands["B8A"].offset) == (1.0, 0.0)


# --------------------------------------------------------------------------------------------
# --band


def test_band_arg_parses(twin: Path, scene_dir: Path):
    nir = twin.parent / "nir.tif"
    arg = parse_band_arg(f"s2:nir={nir}:0.275:-2000")
    assert arg.modality == "s2" and arg.band == BandFile("B08", str(nir), offset=-2000.0, scale=0.275)
    assert parse_band_arg(f"b8a={nir}").band == BandFile("B8A", str(nir))
    assert parse_band_arg("vv=s3://bucket/scene/vv.tif").band.path == "/vsis3/bucket/scene/vv.tif"
    assert (
        parse_band_arg("B04=https://example.com:8443/x/B04.tif").band.path
        == "/vsicurl/https://example.com:8443/x/B04.tif"
    )
    # in place of the scene's own B08
    scene = with_bands(open_scene({"s2": str(scene_dir)}), [f"B08={nir}:0.275:-2000"])
    assert (
        scene.modalities["s2"].bands["B08"].path == str(nir) and scene.modalities["s2"].footprint is not None
    )
    a, _ = read_band(scene.modalities["s2"].bands["B08"], TILES[0], 0, "bilinear")
    b, _ = read_band(BandFile("B08", str(scene_dir / "B08.tif")), TILES[0], 0, "bilinear")
    assert np.abs(a - b).max() <= READ_TOLERANCE


@pytest.mark.parametrize(
    "arg, match",
    [
        ("B08", "expected"),
        ("=x.tif", "expected"),
        ("B08=x.tif:abc:1", "must be numbers"),
        ("B08=x.tif:0:1", "non-zero"),
        ("B08=/no/such/file.tif", "does not exist"),
    ],
)
def test_band_arg_errors(arg: str, match: str):
    with pytest.raises(SceneError, match=match) as e:
        parse_band_arg(arg)
    assert e.value.field == "band"


def test_band_arg_needs_its_modality_when_there_are_several(scene_dir: Path, twin: Path):
    scene = open_scene({"s2": str(scene_dir), "x": str(scene_dir / "B04.tif")})
    with pytest.raises(SceneError, match="say which modality") as e:
        with_bands(scene, [f"B08={twin.parent / 'nir.tif'}"])
    assert e.value.field == "band"


@pytest.mark.integration
def test_cli_band_option(scene_dir: Path, twin: Path, tmp_path: Path):
    common = [
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "ukis-csmask",
        "--out",
        str(tmp_path / "x.tif"),
        "--zoom",
        "10",
        "--dry-run",
    ]
    r = run_cli(*common, "--band", f"B08={twin.parent / 'nir.tif'}:abc:1")
    assert r.returncode == 2 and "band:" in r.stderr and "must be numbers" in r.stderr, r.stderr
    r = run_cli(*common, "--band", f"s2:B08={twin.parent / 'nir.tif'}:0.275:-2000")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tiles"] > 0


# --------------------------------------------------------------------------------------------
# (iv) bad items


def _bad_item(tmp_path: Path, stac_item: dict, assets: dict) -> Path:
    path = tmp_path / "item.json"
    path.write_text(json.dumps(_item("bad", assets, stac_item)))
    return path


def test_item_without_usable_bands(stac_item: dict, tmp_path: Path):
    assets = {
        "thumbnail": {"href": "./t.jpg", "type": "image/jpeg"},
        "aot": {"href": "./aot.tif", "type": "image/tiff"},
        "visual": {
            "href": "./v.tif",
            "type": "image/tiff",
            "eo:bands": [{"common_name": "red"}, {"common_name": "green"}, {"common_name": "blue"}],
        },
    }
    with pytest.raises(SceneError, match="no usable band assets") as e:
        open_modality("s2", str(_bad_item(tmp_path, stac_item, assets)))
    assert e.value.field == "scene.s2"


@pytest.mark.parametrize(
    "raster, match",
    [
        ({"scale": "0.0001"}, r"assets\.red\.raster:bands\[0\]\.scale must be a number"),
        ({"scale": True}, r"raster:bands\[0\]\.scale must be a number"),
        ({"scale": 0.0001, "offset": [0]}, r"raster:bands\[0\]\.offset must be a number"),
        ({"scale": 0}, "non-zero"),
        ({"nodata": "none"}, r"raster:bands\[0\]\.nodata must be a number"),
    ],
)
def test_item_with_bad_raster_bands(
    scene_dir: Path, stac_item: dict, tmp_path: Path, raster: dict, match: str
):
    os.symlink(scene_dir / "B04.tif", tmp_path / "red.tif")
    path = _bad_item(tmp_path, stac_item, {"red": _asset("./red.tif", common="red", raster=raster)})
    with pytest.raises(SceneError, match=match) as e:
        open_modality("s2", str(path))
    assert e.value.field == "scene.s2"


@pytest.mark.integration
def test_bad_items_exit_2_and_write_nothing(scene_dir: Path, stac_item: dict, tmp_path: Path):
    """`tilefm run` on an item without usable bands, or whose scale is not a number: exit 2, one
    line naming the field, no output."""
    os.symlink(scene_dir / "B04.tif", tmp_path / "red.tif")
    red = _asset("./red.tif", common="red", raster={"scale": "0.0001"})
    cases = {
        "no usable band assets": {"thumbnail": {"href": "./t.jpg", "type": "image/jpeg"}},
        "raster:bands[0].scale must be a number": {"red": red},
    }
    for words, assets in cases.items():
        (tmp_path / "item.json").write_text(json.dumps(_item("bad", assets, stac_item)))
        out = tmp_path / "out.tif"
        r = run_cli("run", "--scene", f"s2={tmp_path / 'item.json'}", "--model", "presto", "--out", str(out))
        line = r.stderr.strip()
        assert r.returncode == 2 and len(line.splitlines()) == 1, (words, r.stderr)
        assert "scene.s2" in line and words in line, (words, line)
        assert not out.exists() and not list(tmp_path.glob("out*")), words


def test_item_band_without_href(stac_item: dict, tmp_path: Path):
    path = _bad_item(
        tmp_path, stac_item, {"red": {"type": "image/tiff", "eo:bands": [{"common_name": "red"}]}}
    )
    with pytest.raises(SceneError, match=r"assets\.red\.href") as e:
        open_modality("s2", str(path))
    assert e.value.field == "scene.s2"


# --------------------------------------------------------------------------------------------
# end to end: the twin through `tilefm run` as the native scene


#: one zoom-10 tile in the middle of the scene
E2E_BBOX = "-11.40,24.85,-11.36,24.89"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("model", ["ukis-csmask", "presto"])
def test_twin_runs_like_the_native_scene(twin: Path, scene_dir: Path, tmp_path: Path, model: str):
    """The cloud classes agree on all but a few pixels; Presto's embeddings, kept in float32,
    differ by less than float16 storage itself rounds the map's largest values (measured, 4
    tiles at zoom 10, -11.60,24.62,-11.20,24.98: at most 0.00072 where |x| reaches 4.52, whose
    float16 rounding is up to 0.00195): the twin's own quantisation (0.275 / 2 in the cards'
    units), carried through."""
    outs = {}
    for name, source in (("native", scene_dir), ("twin", twin)):
        out = tmp_path / f"{name}.tif"
        r = run_cli(
            "run", "--scene", f"s2={source}", "--model", model, "--zoom", "10", f"--bbox={E2E_BBOX}",
            "--executor", "local", "--out", str(out), *(["--dtype", "float32"] if model == "presto" else []),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with rasterio.open(out) as src:
            outs[name] = src.read()
    a, b = outs["native"], outs["twin"]
    if model == "ukis-csmask":
        assert (a != 255).all() and (b != 255).all()
        assert (a == b).mean() >= 0.99, (a == b).mean()
    else:
        assert a.dtype == b.dtype == np.float32
        assert not np.isnan(a).any() and not np.isnan(b).any()
        d = np.abs(a - b)
        # float16's rounding error at the map's largest magnitude: half its spacing there
        rounding = float(np.spacing(np.float16(np.abs(a).max()))) / 2
        assert d.max() <= rounding, (d.max(), rounding)
        stored_a, stored_b = a.astype(np.float16), b.astype(np.float16)
        assert (stored_a == stored_b).mean() > 0.8  # stored as float16, most are the same numbers


# --------------------------------------------------------------------------------------------
# end to end: each sensor's item through `tilefm run`, against the sample scene cut to its bands

#: the cloud model: the cloudy zoom-10 tile (480, 438; ESA's SCL: 18 % cloud, and shadows) written
#: as its four zoom-11 tiles: the model runs on the scene's own 100 m grid, so it does the same work
#: as for one zoom-10 tile, and the SCL comparison gets its > 100 000 pixels (E2E_BBOX's tile has
#: no cloud to find)
CLOUDY_TILE_BBOX = "-11.24,24.86,-10.91,25.16"
E2E_RUNS = {"ukis-csmask": ("11", CLOUDY_TILE_BBOX), "presto": ("10", E2E_BBOX)}
#: the Sentinel-2 bands OLI measures (HLS L30 the same)
OLI_IDS = tuple(sorted(OLI_SR.values()))
#: source -> (the sample's bands the sensor has, whether its pixels are the sample's own values)
SENSORS = {
    "landsat-item": (OLI_IDS, False),  # catalogue layout: blue/nir08/... keys, raster:bands
    "landsat-usgs": (OLI_IDS, False),  # a USGS delivery folder: LC09_L2SP_..._SR_B5.TIF
    "hls-s30": (S2_IDS, True),
    "hls-l30": (OLI_IDS, True),  # an item keyed by HLS L30's (Landsat's) band numbers
    "s2-l1c": (S2_IDS, True),  # baseline 02.09: no offset
    "s2-l1c-offset": (S2_IDS, False),  # baseline 04.00: DN + 1000, offset -1000
}
E2E_CASES = [(sensor, model) for sensor in SENSORS for model in ("ukis-csmask", "presto")]


@pytest.fixture(scope="module")
def sensor_sources(
    scene_dir: Path, stac_item: dict, landsat_files: Path, tmp_path_factory
) -> dict[str, Path]:
    """What `--scene s2=` gets for each of SENSORS, all made from the sample's pixels."""
    tmp = tmp_path_factory.mktemp("sensors")
    return {
        "landsat-item": _landsat_item(landsat_files, stac_item, usgs=False),
        "landsat-usgs": landsat_files,
        "hls-s30": _hls_s30(scene_dir, tmp / "s30"),
        "hls-l30": _hls_l30(scene_dir, stac_item, tmp / "l30") / "item.json",
        "s2-l1c": _s2_l1c(scene_dir, stac_item, tmp / "l1c", baseline="02.09"),
        "s2-l1c-offset": _s2_l1c(scene_dir, stac_item, tmp / "l1c-04", baseline="04.00", dn_offset=1000),
    }


def _run(source: Path, model: str, out: Path, *args: str) -> np.ndarray:
    zoom, bbox = E2E_RUNS[model]
    r = run_cli(
        "run", "--scene", f"s2={source}", "--model", model, "--zoom", zoom, f"--bbox={bbox}",
        "--executor", "local", "--out", str(out), *args,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as src:
        return src.read()


@pytest.fixture(scope="module")
def reference_runs(scene_dir: Path, tmp_path_factory):
    """(bands, model) -> the output of the sample scene with only those bands (a folder of links
    to them), run once for the module."""
    runs: dict[tuple[tuple[str, ...], str], np.ndarray] = {}
    tmp = tmp_path_factory.mktemp("references")

    def run(bands: tuple[str, ...], model: str) -> np.ndarray:
        if (bands, model) not in runs:
            folder = tmp / "-".join(bands)
            if not folder.exists():
                _symlinks(scene_dir, folder, {f"{b}.tif": b for b in bands})
            # files without an item: the date (Presto's month) is the sample item's
            out = tmp / f"{folder.name}.{model}.tif"
            runs[bands, model] = _run(folder, model, out, "--date", "2020-02-19")
        return runs[bands, model]

    return run


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("sensor, model", E2E_CASES)
def test_sensor_items_run_end_to_end(
    sensor: str, model: str, sensor_sources: dict, reference_runs, scene_dir: Path, tmp_path: Path
):
    """Landsat C2 L2, HLS S30/L30 and Sentinel-2 L1C through `tilefm run`: the same output as the
    sample scene with the same bands, as Sentinel-2 L2A files. Bit for bit where the sensor's files
    hold the sample's own values; where they went through Landsat's scaling (or L1C's offset), within
    that quantisation, as the twin. The cloud mask finds ESA's clouds."""
    bands, unchanged = SENSORS[sensor]
    got = _run(sensor_sources[sensor], model, tmp_path / "out.tif")
    ref = reference_runs(bands, model)
    assert got.shape == ref.shape
    measured: dict = {"sensor": sensor, "model": model}
    if model == "ukis-csmask":
        from test_run_clouds import _scl_agreement  # here: that module imports onnxruntime & co.

        assert np.array_equal(got == 255, ref == 255)
        assert (got != 255).mean() > 0.99
        measured["agreement"] = float((got == ref).mean())
        agree, ours, esa = _scl_agreement(tmp_path / "out.tif", scene_dir)
        measured.update(scl_agreement=agree, cloud_share=ours, scl_cloud_share=esa)
        print(json.dumps(measured))
        if unchanged:
            assert np.array_equal(got, ref)
        assert measured["agreement"] >= 0.99
        assert esa > 0.1 and agree >= 0.90
    else:
        assert not np.isnan(got).any() and not np.isnan(ref).any()
        a, b = got.astype(np.float32), ref.astype(np.float32)
        d = np.abs(a - b)
        step = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
        measured.update(max_diff=float(d.max()), within_step=float((d <= step + 2**-11).mean()))
        if bands != S2_IDS:  # the bands the sensor lacks are masked: not as with all of them
            full = reference_runs(S2_IDS, model).astype(np.float32)
            measured["max_diff_to_all_bands"] = float(np.abs(b - full).max())
        print(json.dumps(measured))
        if unchanged:
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
        assert measured["max_diff"] <= 0.01
        assert measured["within_step"] > 0.98
        if bands != S2_IDS:
            assert measured["max_diff_to_all_bands"] > 0.1


@pytest.mark.integration
@pytest.mark.parametrize("sensor, drop, band", [("landsat-item", "swir16", "B11"), ("hls-l30", "B06", "B11")])
def test_sensor_item_without_a_required_band(
    sensor: str, drop: str, band: str, sensor_sources: dict, tmp_path: Path
):
    """An item without an asset the cloud model needs and has no stand-in for: exit 2, naming it."""
    source = sensor_sources[sensor]
    item = json.loads(source.read_text())
    del item["assets"][drop]
    for asset in item["assets"].values():
        asset["href"] = str(source.parent / asset["href"])
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))
    out = tmp_path / "out.tif"
    r = run_cli(
        "run", "--scene", f"s2={path}", "--model", "ukis-csmask", "--zoom", "11",
        f"--bbox={CLOUDY_TILE_BBOX}", "--executor", "local", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"{band} missing from" in r.stderr and str(path) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
