"""Time series: a scene of several acquisitions of a modality, each with its own date, read per
timestep and embedded by Presto with every timestep's own month; what refuses one.

The reference (shared/reference/presto/s2_3steps.npz) is three timesteps of 64 pixels of the
sample scene: timestep 2 is the February scene, timesteps 0 and 1 the same scaled per band and
rounded, in December and January (months 11, 0, 1), plus an SRTM token from a DEM elsewhere. The
acceptance test builds those three acquisitions as dated band folders and a DEM that holds the
reference's elevation and slope at the same places, opens them as one scene, reads the tiles that
hold the reference pixels and runs Presto's input preparation and encoder on them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import grpc
import numpy as np
import pytest
import rasterio
import redis
import torch
from conftest import drop_redis_keys, run_cli, settings_from
from fastapi.testclient import TestClient
from pyproj import Transformer
from rasterio.transform import from_origin

from tilefm.card import ModelCard
from tilefm.engine.pipeline import RunSpec, prepare
from tilefm.errors import SceneError
from tilefm.grid import TILE_SIZE, TMS, Tile, resolution
from tilefm.io.bands import bind_card
from tilefm.io.read import check_scene, read_tiles, tile_latitudes
from tilefm.io.scene import open_scene, parse_scene_args
from tilefm.jobs import proto as conv
from tilefm.jobs.models import MAX_SOURCES, JobSpec
from tilefm.models import get_card
from tilefm.models.presto import MAX_TIMESTEPS, load_presto
from tilefm.models.presto_tiles import PrestoInputs, PrestoTileModel

SHARED = Path(__file__).resolve().parents[2] / "shared"
SCENE = SHARED / "data" / "s2-l2a-29RKH-20200219"
REF = SHARED / "reference" / "presto" / "s2_3steps.npz"
WEIGHTS = SHARED / "models" / "presto" / "default_model.pt"
TOL = 1e-4
#: Sentinel-2 bands in the order the reference's scaling counts them (k = 0..11)
S2_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
PRESTO_S2 = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
#: the reference's timesteps as dates: December, January, February (months 11, 0, 1)
REF_DAYS = ["20191222", "20200120", "20200219"]
#: tiles fine enough that the tile pixel holding a scene pixel's centre has its centre within
#: ~6 m of it (the scene's pixels are 100 m): read by nearest neighbour, it is that scene pixel
ZOOM = 14


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _band_folder(folder: Path, step: int, zero_at: list[tuple[int, int]] = ()) -> Path:
    """The sample's Presto bands as the reference's timestep `step` (2: the files themselves;
    0 and 1: scaled per band and rounded as the reference's `info` says), with nodata (0) at the
    100 m pixels `zero_at`."""
    folder.mkdir(parents=True)
    for band in PRESTO_S2:
        if step == 2 and not zero_at:
            os.symlink(SCENE / f"{band}.tif", folder / f"{band}.tif")
            continue
        with rasterio.open(SCENE / f"{band}.tif") as src:
            values, profile = src.read(1).astype(np.float64), src.profile
            factor = 1098 // src.height  # 200 m bands: a 100 m pixel (r, c) is (r // 2, c // 2)
        if step < 2:
            values = np.round(values * (1 - 0.03 * (2 - step) * (1 + 0.05 * S2_ORDER.index(band))))
        for r, c in zero_at:
            values[r // factor, c // factor] = 0
        with rasterio.open(folder / f"{band}.tif", "w", **profile) as dst:
            dst.write(values.astype(profile["dtype"]), 1)
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A folder of the reference's three acquisitions, band folders named by their dates."""
    root = tmp_path_factory.mktemp("series") / "s2"
    for step, day in enumerate(REF_DAYS):
        _band_folder(root / f"S2A_29RKH_{day}", step)
    return root


@pytest.fixture(scope="module")
def pixels(ref: dict[str, np.ndarray]) -> tuple[list[Tile], np.ndarray, np.ndarray]:
    """The z14 tile holding each reference pixel's centre, and that pixel's global column and row."""
    with rasterio.open(SCENE / "B02.tif") as src:
        t, crs = src.transform, src.crs
    rc = ref["scene_row_col"]
    x, y = Transformer.from_crs(crs, "EPSG:3857", always_xy=True).transform(
        t.c + (rc[:, 1] + 0.5) * t.a, t.f + (rc[:, 0] + 0.5) * t.e
    )
    origin = TMS.xy_bounds(0, 0, ZOOM)
    gx = np.floor((np.asarray(x) - origin.left) / resolution(ZOOM)).astype(int)
    gy = np.floor((origin.top - np.asarray(y)) / resolution(ZOOM)).astype(int)
    return [Tile(int(a // TILE_SIZE), int(b // TILE_SIZE), ZOOM) for a, b in zip(gx, gy, strict=True)], gx, gy


@pytest.fixture(scope="module")
def dem(ref: dict[str, np.ndarray], pixels, tmp_path_factory) -> Path:
    """A DEM on the z14 grid (a VRT of small patches) that gives each reference pixel the
    reference's elevation and, by the Horn slope tilefm computes on the tile, its slope: a plane
    rising along the row by tan(slope) per metre of ground. (The reference's DEM cells are in
    another place, so they cannot be read at the scene's pixels.)"""
    tiles, gx, gy = pixels
    root = tmp_path_factory.mktemp("dem")
    res, origin, size = resolution(ZOOM), TMS.xy_bounds(0, 0, ZOOM), 9
    half = size // 2
    x0, y0 = int(gx.min()) - half, int(gy.min()) - half
    sources = []
    for i, (tile, col, row) in enumerate(zip(tiles, gx, gy, strict=True)):
        cell = res * np.cos(
            np.radians(tile_latitudes(tile, TILE_SIZE, 0)[row % TILE_SIZE])
        )  # as presto_tiles takes it
        grade = np.tan(np.radians(np.float64(ref["raw"][i, 0, 15])))
        plane = np.float64(ref["raw"][i, 0, 14]) + grade * cell * (np.arange(size) - half)
        with rasterio.open(
            root / f"p{i}.tif",
            "w",
            driver="GTiff",
            width=size,
            height=size,
            count=1,
            dtype="float32",
            crs="EPSG:3857",
            nodata=-9999,
            transform=from_origin(
                origin.left + (col - half) * res, origin.top - (row - half) * res, res, res
            ),
        ) as dst:
            dst.write(np.repeat(plane[None], size, 0).astype(np.float32), 1)
        sources.append(
            "<SimpleSource><SourceFilename "
            f'relativeToVRT="1">p{i}.tif</SourceFilename><SourceBand>1</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/>'
            f'<DstRect xOff="{col - half - x0}" yOff="{row - half - y0}" xSize="{size}" '
            f'ySize="{size}"/></SimpleSource>'
        )
    width, height = int(gx.max()) + half + 1 - x0, int(gy.max()) + half + 1 - y0
    transform = ", ".join(
        repr(float(v)) for v in (origin.left + x0 * res, res, 0, origin.top - y0 * res, 0, -res)
    )
    vrt = root / "dem.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="{width}" '
        f'rasterYSize="{height}"><SRS>EPSG:3857</SRS><GeoTransform>{transform}</GeoTransform>'
        '<VRTRasterBand dataType="Float32" '
        f'band="1"><NoDataValue>-9999</NoDataValue>{"".join(sources)}</VRTRasterBand></VRTDataset>'
    )
    return vrt


@pytest.fixture(scope="module")
def card() -> ModelCard:
    """Presto's card read by nearest neighbour: a tile pixel then holds the scene pixel it lies in."""
    presto = get_card("presto")
    return presto.model_copy(
        update={"inputs": [i.model_copy(update={"resampling": "nearest"}) for i in presto.inputs]}
    )


@pytest.fixture(scope="module")
def model(card: ModelCard) -> PrestoTileModel:
    return PrestoTileModel(card, "torch", WEIGHTS)


def _series_pixels(scene, card: ModelCard, pixels, which: list[int]):
    """The reference pixels `which` through the time-series path: the scene's tiles read
    (`read_tiles`), prepared by `PrestoInputs` (per-timestep values, masks and month table), the
    rows of those pixels kept. Returns (raw, present, latlons, month table)."""
    tiles, gx, gy = pixels
    scene = bind_card(scene, card)
    check_scene(scene, card)
    inputs = read_tiles(scene, card, [tiles[i] for i in which], 0)
    prep = PrestoInputs(card)
    rows, months = [], []
    for i, ti in zip(which, inputs, strict=True):
        assert ti.tile == tiles[i] and ti.data.shape == (len(scene.timesteps), 13, TILE_SIZE, TILE_SIZE)
        batch = prep([ti])
        at = (gy[i] % TILE_SIZE) * TILE_SIZE + gx[i] % TILE_SIZE
        assert batch.valid[0].ravel()[at]
        k = np.count_nonzero(batch.valid[0].ravel()[:at])
        rows.append((batch.raw[k], batch.present[k], batch.latlons[k]))
        months.append(batch.month)
    assert all(np.array_equal(m, months[0]) for m in months)
    return *(np.stack([r[j] for r in rows]) for j in range(3)), months[0]


# -- the acceptance test ---------------------------------------------------------------------------


def test_reference_pixels_through_the_series_scene(ref, series: Path, dem: Path, pixels, card, model) -> None:
    scene = open_scene({"s2": str(series), "dem": str(dem)})
    assert scene.timesteps == [date(2019, 12, 22), date(2020, 1, 20), date(2020, 2, 19)]
    assert list(scene.series) == ["s2"] and "dem" not in scene.series  # a DEM given once is static
    which = list(range(len(ref["embedding"])))
    raw, present, latlons, month = _series_pixels(scene, card, pixels, which)
    # each timestep's own month reaches the model: December, January, February
    assert month.tolist() == [[11, 0, 1]] == ref["months"][:1].tolist()
    # the values read are the reference's, timestep by timestep, and so are the masks
    ref_present = ref["mask"][..., :16] == 0
    np.testing.assert_array_equal(present, ref_present)
    np.testing.assert_array_equal(
        raw[..., :14][present[..., :14]], ref["raw"][..., :14][ref_present[..., :14]]
    )
    assert np.abs(raw[..., 15] - ref["raw"][..., 15]).max() < 1e-3  # slope, degrees (float32 elevations)
    assert np.abs(latlons - ref["latlons"]).max() < 1e-4  # tile pixel centres within ~6 m of the scene's
    seen = []
    forward = model.net.forward
    model.net.forward = lambda *a, **kw: (seen.append(a[4]), forward(*a, **kw))[1]
    try:
        emb = model.embed(raw, present, latlons, month)
    finally:
        del model.net.forward
    assert np.asarray(seen[0]).tolist() == [[11, 0, 1]]
    assert emb.dtype == np.float32 and emb.shape == ref["embedding"].shape
    diff = float(np.abs(emb.astype(np.float64) - ref["embedding"]).max())
    print(f"series scene -> Presto vs reference embedding: max abs diff {diff:.3g}")
    assert diff < TOL, diff


def test_months_are_each_timesteps_own(
    ref, series: Path, dem: Path, pixels, card, model, tmp_path: Path
) -> None:
    """Dates months apart and across a year: the encoder gets each timestep's month, not a run
    of consecutive ones from the first, and embeds as the official encoder does with that table."""
    days = ["20190305", "20190720", "20200110"]  # months 2, 6, 0
    root = tmp_path / "s2"
    for day, folder in zip(days, sorted(series.iterdir()), strict=True):
        (root / f"S2A_29RKH_{day}").mkdir(parents=True)
        for f in folder.iterdir():
            os.symlink(f.resolve(), root / f"S2A_29RKH_{day}" / f.name)
    which = list(range(0, 64, 8))
    raw, present, latlons, month = _series_pixels(
        open_scene({"s2": str(root), "dem": str(dem)}), card, pixels, which
    )
    assert month.tolist() == [[2, 6, 0]]
    seen = []
    forward = model.net.forward
    model.net.forward = lambda *a, **kw: (seen.append(a[4]), forward(*a, **kw))[1]
    try:
        emb = model.embed(raw, present, latlons, month)
    finally:
        del model.net.forward
    assert np.asarray(seen[0]).tolist() == [[2, 6, 0]]
    table = np.tile(np.array([[2, 6, 0]]), (len(which), 1))
    with torch.inference_mode():
        official = load_presto(WEIGHTS)(
            ref["x"][which], ref["mask"][which], ref["dynamic_world"][which], ref["latlons"][which], table
        ).numpy()
    assert np.abs(emb - official).max() < TOL
    assert np.abs(emb - ref["embedding"][which]).max() > 10 * TOL  # the months matter


def test_a_gap_masks_its_timestep_only(
    ref, series: Path, dem: Path, pixels, card, model, tmp_path: Path
) -> None:
    """A pixel without data at one date: its values there are masked, those of the other dates
    are not, and the embedding is the official encoder's with that timestep's bands masked."""
    which = list(range(8))
    holes = [tuple(map(int, ref["scene_row_col"][i])) for i in which[:4]]
    root = tmp_path / "s2"
    root.mkdir()
    for step, day in enumerate(REF_DAYS):
        if step == 1:
            _band_folder(root / f"S2A_29RKH_{day}", step, zero_at=holes)
        else:
            (root / f"S2A_29RKH_{day}").symlink_to(sorted(series.iterdir())[step])
    raw, present, latlons, month = _series_pixels(
        open_scene({"s2": str(root), "dem": str(dem)}), card, pixels, which
    )
    s2 = slice(2, 12)
    assert not present[:4, 1, s2].any() and present[:4, 0, s2].all() and present[:4, 2, s2].all()
    assert present[4:, :, s2].all()
    mask = ref["mask"][which].copy()
    mask[:4, 1, 2:12] = mask[:4, 1, 16] = 1  # Sentinel-2 and NDVI at timestep 1
    with torch.inference_mode():
        official = load_presto(WEIGHTS)(
            ref["x"][which], mask, ref["dynamic_world"][which], ref["latlons"][which], 11
        ).numpy()
    emb = model.embed(raw, present, latlons, month)
    assert np.abs(emb - official).max() < TOL
    assert np.abs(emb[:4] - ref["embedding"][:4]).max() > 10 * TOL


# -- the encoder's month argument ------------------------------------------------------------------


def test_encoder_month_forms(ref) -> None:
    """One int (consecutive months from it), a [n, t] table and its one-row [1, t] form agree
    where they mean the same; chunking keeps a table's rows with their pixels."""
    net = load_presto(WEIGHTS)
    x, mask, dw, ll = ref["x"], ref["mask"], ref["dynamic_world"], ref["latlons"]
    with torch.inference_mode():
        start = net(x, mask, dw, ll, 11).numpy()
        table = net(x, mask, dw, ll, ref["months"]).numpy()
        one_row = net(x, mask, dw, ll, ref["months"][:1], chunk_size=5).numpy()
        mixed = np.array([[2, 6, 0], [11, 0, 1]] * 32)
        chunked = net(x, mask, dw, ll, mixed, chunk_size=7).numpy()
        whole = net(x, mask, dw, ll, mixed, chunk_size=None).numpy()
    assert np.abs(start - ref["embedding"]).max() < TOL
    assert np.abs(table - start).max() < 1e-5 and np.abs(one_row - start).max() < 1e-5
    assert np.abs(chunked - whole).max() < 1e-5
    assert (
        np.abs(chunked[1::2] - start[1::2]).max() < 1e-5
        and np.abs(chunked[::2] - start[::2]).max() > 10 * TOL
    )


def test_card_limit_is_the_encoders() -> None:
    assert get_card("presto").max_timesteps == MAX_TIMESTEPS == 24
    assert all(get_card(n).max_timesteps == 1 for n in ("ukis-csmask", "vit-small", "vit-base"))


# -- the forms of a time series --------------------------------------------------------------------


def _item(path: Path, item_id: str, when: str, folder: Path) -> dict:
    """The sample's STAC item as another acquisition: its id, datetime and band files."""
    item = json.loads((SCENE / "stac-item.json").read_text())
    item["id"], item["properties"]["datetime"] = item_id, when
    for asset in item["assets"].values():
        asset["href"] = str(folder / Path(asset["href"]).name)
    return item


def test_sources_items_and_collections(series: Path, tmp_path: Path) -> None:
    folders = sorted(series.iterdir())
    expected = [date(2019, 12, 22), date(2020, 1, 20), date(2020, 2, 19)]
    # a list of sources, in any order: sorted by date
    listed = open_scene({"s2": [str(folders[2]), str(folders[0]), str(folders[1])]})
    assert listed.timesteps == expected and [m.source for m in listed.series["s2"]] == [
        str(f) for f in folders
    ]
    assert listed.modalities["s2"] is listed.series["s2"][0] and listed.date == expected[0]
    # a STAC ItemCollection (a search result), its items' own datetimes
    items = [
        _item(tmp_path, f"i{k}", f"{d.isoformat()}T11:00:00Z", f)
        for k, (d, f) in enumerate(zip(expected, folders, strict=True))
    ]
    collection = tmp_path / "search.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items[::-1]}))
    scene = open_scene({"s2": str(collection)})
    assert scene.timesteps == expected
    assert [m.source for m in scene.series["s2"]] == [f"{collection}#i{k}" for k in range(3)]
    assert sorted(scene.series["s2"][0].bands) == sorted(
        PRESTO_S2
    )  # the item's other assets have no file here
    # repeated --scene arguments
    assert parse_scene_args([f"s2={folders[0]}", "dem=/d", f"s2={folders[1]}"]) == {
        "s2": [str(folders[0]), str(folders[1])],
        "dem": "/d",
    }
    assert parse_scene_args(["s2=/a"]) == {"s2": "/a"}
    # one acquisition is a scene of one date, as before
    single = open_scene({"s2": [str(folders[2])]})
    assert not single.series and single.timesteps == [] and single.date == expected[2]
    one_item = tmp_path / "one.json"
    one_item.write_text(json.dumps({"type": "FeatureCollection", "features": items[2:]}))
    assert not open_scene({"s2": str(one_item)}).series


def test_scene_errors(series: Path, tmp_path: Path) -> None:
    folders = sorted(series.iterdir())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(SceneError, match="no items") as e:
        open_scene({"s2": str(empty)})
    assert e.value.field == "scene.s2"
    undated = tmp_path / "undated"
    undated.mkdir()
    os.symlink(SCENE / "B02.tif", undated / "B02.tif")
    with pytest.raises(SceneError, match="no acquisition date") as e:
        open_scene({"s2": [str(folders[0]), str(undated)]})
    assert e.value.field == "scene.s2"
    with pytest.raises(SceneError, match="both from 2019-12-22") as e:
        open_scene({"s2": [str(folders[0]), str(folders[0])]})
    assert e.value.field == "scene.s2"
    with pytest.raises(SceneError, match="own") as e:
        open_scene({"s2": [str(folders[0]), str(folders[1])]}, date_override=date(2020, 2, 19))
    assert e.value.field == "date"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_item(tmp_path, "x", "the day after", folders[0])))
    with pytest.raises(SceneError, match="not a date") as e:
        open_scene({"s2": [str(bad), str(folders[1])]})
    assert e.value.field == "scene.s2"


def test_only_models_that_take_a_series(series: Path, tmp_path: Path) -> None:
    folders = [str(f) for f in sorted(series.iterdir())]
    out = str(tmp_path / "x.tif")
    with pytest.raises(SceneError, match="takes one date") as e:
        prepare(RunSpec(scene={"s2": folders}, model="ukis-csmask", out=out))
    assert e.value.field == "scene.s2"
    with pytest.raises(SceneError, match="does not read 'foo'") as e:
        prepare(RunSpec(scene={"s2": folders, "foo": folders[:2]}, model="presto", out=out))
    assert e.value.field == "scene.foo"
    prep = prepare(RunSpec(scene={"s2": folders}, model="presto", out=out))
    assert prep.summary()["timesteps"] == ["2019-12-22", "2020-01-20", "2020-02-19"]
    assert "timesteps" not in prepare(RunSpec(scene={"s2": folders[2]}, model="presto", out=out)).summary()


def _dated(root: Path, days: list[str]) -> list[Path]:
    """Band folders of the sample's Presto bands, one per date (links to its files)."""
    out = []
    for day in days:
        folder = root / f"S2A_29RKH_{day}"
        folder.mkdir(parents=True)
        for band in PRESTO_S2:
            os.symlink(SCENE / f"{band}.tif", folder / f"{band}.tif")
        out.append(folder)
    return out


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_dry_run_and_small_run(tmp_path: Path) -> None:
    a, b = _dated(tmp_path, ["20200105", "20200219"])
    out = tmp_path / "emb.tif"
    args = ["run", "--scene", f"s2={b}", "--scene", f"s2={a}", "--model", "presto", "--out", str(out)]
    r = run_cli(*args, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["timesteps"] == ["2020-01-05", "2020-02-19"]
    r = run_cli(*args, "--zoom", "10", "--bbox", "-11.45,24.75,-11.40,24.80", "--executor", "local")
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as src:
        assert src.count == 128
        assert json.loads(src.tags()["TILEFM_TIMESTEPS"]) == ["2020-01-05", "2020-02-19"]
        emb = src.read(1)
    assert np.isfinite(emb).any()
    item = json.loads((tmp_path / "emb.stac.json").read_text())
    props = item["properties"]
    assert props["tilefm:timesteps"] == ["2020-01-05", "2020-02-19"]
    assert (props["start_datetime"], props["end_datetime"]) == (
        "2020-01-05T00:00:00Z",
        "2020-02-19T00:00:00Z",
    )
    assert [t["source"] for t in props["tilefm:scene"]["s2"]["timesteps"]] == [str(a), str(b)]


@pytest.mark.integration
def test_cli_bad_series(tmp_path: Path) -> None:
    days = [f"2019{m:02d}{d:02d}" for m in range(1, 13) for d in (5, 20)] + ["20200105"]  # 25 dates
    folders = _dated(tmp_path / "many", days)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_item(tmp_path, "x", "2020-02-31T00:00:00Z", folders[0])))
    out = ["--out", str(tmp_path / "x.tif"), "--dry-run"]
    cases = {
        "more dates than the model takes": (
            ["--model", "presto", *(a for f in folders for a in ("--scene", f"s2={f}"))],
            ["scene.s2", "25 dates", "(24)"],
        ),
        "a model of one date": (
            ["--model", "ukis-csmask", "--scene", f"s2={folders[0]}", "--scene", f"s2={folders[1]}"],
            ["scene.s2", "takes one date"],
        ),
        "an item's datetime is not a date": (
            ["--model", "presto", "--scene", f"s2={bad}", "--scene", f"s2={folders[1]}"],
            ["scene.s2", "not a date", "2020-02-31"],
        ),
        "--date on a series": (
            [
                "--model",
                "presto",
                "--scene",
                f"s2={folders[0]}",
                "--scene",
                f"s2={folders[1]}",
                "--date",
                "2020-02-19",
            ],
            ["date:", "own"],
        ),
        "--date not a date": (
            [
                "--model",
                "presto",
                "--scene",
                f"s2={folders[0]}",
                "--scene",
                f"s2={folders[1]}",
                "--date",
                "2020-02-30",
            ],
            ["date:", "YYYY-MM-DD"],
        ),
        "an empty ItemCollection": (
            ["--model", "presto", "--scene", f"s2={empty}"],
            ["scene.s2", "no items"],
        ),
    }
    for name, (args, words) in cases.items():
        r = run_cli("run", *args, *out)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        line = r.stderr.strip()
        assert line.startswith("tilefm: error:") and len(line.splitlines()) == 1, (name, line)
        assert all(w in line for w in words), (name, line)


# -- the job API -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_env(tmp_path_factory) -> Iterator[tuple[dict[str, str], Path, list[str]]]:
    """A job service's settings (sources under a folder of its own, outputs to a file:// prefix),
    and 25 dated band folders there."""
    root = tmp_path_factory.mktemp("api")
    folders = [
        str(f)
        for f in _dated(
            root / "many", [f"2019{m:02d}{d:02d}" for m in range(1, 13) for d in (5, 20)] + ["20200105"]
        )
    ]
    prefix = f"tilefm-test-{uuid.uuid4().hex[:8]}:"
    env = {
        **{k: v for k, v in os.environ.items() if k.startswith("TILEFM_")},
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(root), str(SHARED / "data")]),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps([f"file://{root}/out/"]),
        "TILEFM_AUTH_DISABLED": "true",
    }
    yield env, root, folders
    drop_redis_keys(prefix)


def test_http_series(api_env) -> None:
    from tilefm.api.jobs import create_app

    env, root, folders = api_env
    empty = root / "empty.json"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    bad = root / "bad.json"
    bad.write_text(json.dumps(_item(root, "x", "yesterday", Path(folders[0]))))
    base = {
        "model": "presto",
        "zoom": 10,
        "bbox": [-11.45, 24.75, -11.40, 24.80],
        "output_prefix": f"file://{root}/out/",
    }
    with TestClient(create_app(settings_from(env))) as api:
        r = api.post("/v1/jobs", json={**base, "scene": {"s2": folders[:3]}})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["spec"]["scene"] == {"s2": folders[:3]}
        assert api.get(f"/v1/jobs/{job['id']}").json()["spec"]["scene"]["s2"] == folders[:3]
        bad_cases = {
            "more dates than the model takes": ({"scene": {"s2": folders}}, "scene.s2", "(24)"),
            "a model of one date": (
                {"scene": {"s2": folders[:2]}, "model": "ukis-csmask", "zoom": 11},
                "scene.s2",
                "takes one date",
            ),
            "an item's datetime is not a date": (
                {"scene": {"s2": [str(bad), folders[0]]}},
                "scene.s2",
                "not a date",
            ),
            "date on a series": ({"scene": {"s2": folders[:2]}, "date": "2020-02-19"}, "date", "own"),
            "date not a date": (
                {"scene": {"s2": folders[:2]}, "date": "2020-02-30"},
                "date",
                "calendar date",
            ),
            "an empty ItemCollection": ({"scene": {"s2": str(empty)}}, "scene.s2", "no items"),
            "a list too long": (
                {"scene": {"s2": [folders[0]] * (MAX_SOURCES + 1)}},
                "scene.s2",
                f"limit of {MAX_SOURCES}",
            ),
            "an empty list": ({"scene": {"s2": []}}, "scene.s2", "at least one"),
            "not sources": ({"scene": {"s2": [1, 2]}}, "scene.s2", "list of sources"),
            "a source not allowed": ({"scene": {"s2": [folders[0], "/etc"]}}, "scene.s2", "/etc"),
        }
        for name, (body, field, words) in bad_cases.items():
            r = api.post("/v1/jobs", json={**base, **body})
            assert r.status_code == 422, (name, r.text)
            err = r.json()["error"]
            assert err["field"] == field and words in err["message"], (name, err)


def test_proto_series_round_trip_and_grpc(api_env, model_store: Path) -> None:
    from tilefm.api.auth import KeyRing
    from tilefm.api.grpc_service import FIELD_METADATA_KEY, create_server
    from tilefm.jobs.proto import pb, pb_grpc
    from tilefm.jobs.service import JobService
    from tilefm.jobs.store import JobStore
    from tilefm.settings import Settings

    env, root, folders = api_env
    spec = JobSpec(scene={"s2": ["/a", "/b"], "dem": "/d"}, model="presto", output_prefix="file:///o/")
    msg = conv.spec_to_proto(spec)
    assert dict(msg.scene) == {"dem": "/d"} and list(msg.scene_series["s2"].sources) == ["/a", "/b"]
    assert conv.spec_from_proto(pb.JobSpec.FromString(msg.SerializeToString())) == spec
    # a client that knows only `scene` sends and reads what it always did
    single = JobSpec(scene={"s2": "/a"}, model="m", output_prefix="file:///o/")
    assert not conv.spec_to_proto(single).scene_series

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    service = JobService(JobStore(client, env["TILEFM_REDIS_PREFIX"]), settings_from(env))
    server, port = create_server(service, "127.0.0.1:0", keyring=KeyRing(Settings(auth_disabled=True)))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.JobServiceStub(channel)
        base = dict(
            model="presto",
            zoom=10,
            output_prefix=f"file://{root}/out/",
            bbox=pb.BBox(min_lon=-11.45, min_lat=24.75, max_lon=-11.40, max_lat=24.80),
        )
        got = stub.Submit(
            pb.SubmitRequest(
                spec=pb.JobSpec(scene_series={"s2": pb.SourceList(sources=folders[:2])}, **base)
            ),
            timeout=60,
        )
        assert list(got.job.spec.scene_series["s2"].sources) == folders[:2] and not got.job.spec.scene
        for spec_msg, words in [
            (pb.JobSpec(scene_series={"s2": pb.SourceList(sources=folders)}, **base), "(24)"),
            (
                pb.JobSpec(
                    scene={"s2": folders[0]}, scene_series={"s2": pb.SourceList(sources=folders[:2])}, **base
                ),
                "both",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Submit(pb.SubmitRequest(spec=spec_msg), timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
            assert dict(info.value.trailing_metadata())[FIELD_METADATA_KEY] == "scene.s2"
    finally:
        channel.close()
        server.stop(grace=None).wait()
        client.close()
