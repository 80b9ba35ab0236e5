"""Presto over part of the sample scene, from its STAC item, to a real S3 server through Ray; the
stored embeddings match Presto recomputed on independently read pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rio_cogeo import cog_validate

from tilefm.engine.cog import stored_dtype
from tilefm.grid import TILE_SIZE, TMS, Tile, resolution
from tilefm.io.read import WARP_TOLERANCE, read_tile
from tilefm.io.scene import open_scene
from tilefm.models import get_card
from tilefm.models.presto import RAW_BAND_NAMES, load_presto, normalize
from tilefm.storage import storage_for

#: `tilefm run` on a local Ray cluster, to the S3 server, and on the local executor
pytestmark = pytest.mark.integration

ZOOM = 10
BBOX = "-11.60,24.62,-11.20,24.98"  # about 3 x 3 tiles in the middle of the scene
S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


@pytest.fixture(scope="module")
def presto_s3(s3_settings, scene_dir: Path, tmp_path_factory) -> Path:
    uri = "s3://tilefm/tests/presto.tif"
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir / 'stac-item.json'}",
        "--model",
        "presto",
        "--zoom",
        str(ZOOM),
        "--bbox",
        BBOX,
        "--out",
        uri,
    )
    assert r.returncode == 0, r.stderr
    store = storage_for(uri, s3_settings)
    assert store.exists("s3://tilefm/tests/presto.stac.json")
    local = tmp_path_factory.mktemp("presto") / "presto.tif"
    store.get_file(uri, local)
    return local


def test_embedding_cog(presto_s3: Path) -> None:
    valid, errors, _ = cog_validate(str(presto_s3), quiet=True)
    assert valid, errors
    with rasterio.open(presto_s3) as src:
        assert src.count == 128 and src.crs.to_epsg() == 3857
        assert src.res[0] == pytest.approx(resolution(ZOOM), rel=1e-12)
        assert stored_dtype(src) == "float16"
        assert src.descriptions[0] == "embedding_000"
        assert np.isnan(src.nodata)
        tags = src.tags()
        assert tags["TILEFM_MODEL"] == "presto" and "stac-item.json" in tags["TILEFM_SCENE"]
        emb = src.read()
    valid = ~np.isnan(emb).any(0)
    assert valid.mean() > 0.99  # the bbox is inside the scene
    assert np.abs(emb[:, valid]).max() < 6


def _tile_raw(scene_dir: Path, x: int, y: int) -> np.ndarray:
    """Sentinel-2 bands of one tile, read independently of tilefm: [256, 256, 16] Presto raw.
    Where the bands are upsampled (the 200 m ones at this zoom), exact bilinear interpolation at
    pyproj-transformed pixel centres (tilefm samples these itself); where they are downsampled,
    GDAL's warper in float32 (tilefm hands those reads to it). Neither is rounded to whole DN."""
    b = TMS.xy_bounds(x, y, ZOOM)
    transform = rasterio.transform.from_bounds(b.left, b.bottom, b.right, b.top, TILE_SIZE, TILE_SIZE)
    res = (b.right - b.left) / TILE_SIZE
    xs, ys = np.meshgrid(
        b.left + (np.arange(TILE_SIZE) + 0.5) * res, b.top - (np.arange(TILE_SIZE) + 0.5) * res
    )
    raw = np.zeros((TILE_SIZE, TILE_SIZE, len(RAW_BAND_NAMES)), np.float32)
    for name in S2_BANDS:
        with rasterio.open(scene_dir / f"{name}.tif") as src:
            e, n = Transformer.from_crs("EPSG:3857", src.crs, always_xy=True).transform(xs, ys)
            col, row = ~src.transform * (np.asarray(e), np.asarray(n))
            if np.hypot(np.diff(col, axis=1), np.diff(row, axis=1)).max() <= 1:
                arr = src.read(1).astype(np.float64)
                c0, r0 = np.floor(col - 0.5).astype(int), np.floor(row - 0.5).astype(int)
                fc, fr = col - 0.5 - c0, row - 0.5 - r0
                v = (arr[r0, c0] * (1 - fc) * (1 - fr) + arr[r0, c0 + 1] * fc * (1 - fr)
                     + arr[r0 + 1, c0] * (1 - fc) * fr + arr[r0 + 1, c0 + 1] * fc * fr)  # fmt: skip
                values = v
            else:
                with WarpedVRT(
                    src,
                    crs="EPSG:3857",
                    transform=transform,
                    width=TILE_SIZE,
                    height=TILE_SIZE,
                    resampling=Resampling.bilinear,
                    tolerance=WARP_TOLERANCE,
                    dtype="float32",
                ) as vrt:
                    values = vrt.read(1)
        raw[..., RAW_BAND_NAMES.index(name.replace("B0", "B"))] = values
    return raw


def test_pixels_match_presto_recomputed(presto_s3: Path, scene_dir: Path, model_store: Path) -> None:
    net = load_presto(model_store / "presto" / "default_model.pt")
    rng = np.random.default_rng(0)
    with rasterio.open(presto_s3) as src:
        emb = src.read()
        t = src.transform
        ox = round((t.c - TMS.xy_bounds(0, 0, ZOOM).left) / src.res[0])
        oy = round((TMS.xy_bounds(0, 0, ZOOM).top - t.f) / src.res[1])
    rows = rng.integers(0, emb.shape[1], 300)
    cols = rng.integers(0, emb.shape[2], 300)
    keep = ~np.isnan(emb[0, rows, cols])
    rows, cols = rows[keep], cols[keep]
    raw, latlons, stored = [], [], []
    independent = []
    tiles: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    scene, card = open_scene({"s2": str(scene_dir / "stac-item.json")}), get_card("presto")
    for r, c in zip(rows, cols, strict=True):
        gx, gy = ox + c, oy + r
        key = (gx // TILE_SIZE, gy // TILE_SIZE)
        if key not in tiles:
            ours = read_tile(scene, card, Tile(*key, ZOOM), 0)
            as_raw = np.zeros((TILE_SIZE, TILE_SIZE, len(RAW_BAND_NAMES)), np.float32)
            for name in S2_BANDS:
                as_raw[..., RAW_BAND_NAMES.index(name.replace("B0", "B"))] = ours.data[
                    ours.band_names.index(f"s2:{name}")
                ]
            tiles[key] = (as_raw, _tile_raw(scene_dir, *key))
        values, reference = tiles[key]
        raw.append(values[gy % TILE_SIZE, gx % TILE_SIZE])
        independent.append(reference[gy % TILE_SIZE, gx % TILE_SIZE])
        lon, lat = TMS.lnglat(*(t @ (c + 0.5, r + 0.5)))
        latlons.append((lat, lon))
        stored.append(emb[:, r, c])
    raw = np.array(raw)[:, None, :]
    present = np.zeros_like(raw, bool)
    for name in S2_BANDS:
        present[..., RAW_BAND_NAMES.index(name.replace("B0", "B"))] = True
    x, mask = normalize(raw, present)
    expected = net(x, mask, np.full(x.shape[:2], 9), np.array(latlons, np.float32), 1).detach().numpy()
    stored = np.array(stored)
    step = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32)  # float16 quantization step
    diff = np.abs(stored - expected)
    assert len(rows) > 250
    # the stored embedding is Presto on the pixels tilefm reads (stitching, dates, positions)...
    assert (diff <= step + 1e-4).all(), f"max diff {diff.max():.2e}, worst excess {(diff - step).max():.2e}"
    # ... and those pixels are the independently read ones, to the coordinates' precision
    # (tilefm's within 0.001 px of exact, GDAL's approximated to 0.001 px per extent; measured:
    # 94 % within 0.01, 99 % within 0.024, at most 0.105 where the image is steepest)
    off = np.abs(raw[:, 0] - np.array(independent))
    assert off.max() <= 0.5 and np.quantile(off, 0.99) <= 0.05, (off.max(), np.quantile(off, 0.99))


def test_int8_output_locally(scene_dir: Path, tmp_path: Path, presto_s3: Path) -> None:
    """The same run stored as int8 with scale/offset, in-process: de-quantized values agree with
    the float16 output within half a step."""
    out = tmp_path / "presto-int8.tif"
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "presto",
        "--zoom",
        str(ZOOM),
        "--bbox",
        "-11.5,24.75,-11.45,24.8",
        "--dtype",
        "int8",
        "--executor",
        "local",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as q, rasterio.open(presto_s3) as f:
        assert q.dtypes[0] == "int8" and q.nodata == -128
        scale, offset = q.scales[0], q.offsets[0]
        assert scale == pytest.approx(12 / 254) and offset == 0
        assert q.transform.a == f.transform.a
        col_off = round((q.transform.c - f.transform.c) / f.transform.a)
        row_off = round((f.transform.f - q.transform.f) / f.transform.a)
        qa = q.read()
        window = rasterio.windows.Window(col_off, row_off, q.width, q.height)
        fa = f.read(window=window, boundless=True, fill_value=np.nan)
    valid = (qa[0] != -128) & ~np.isnan(fa[0])
    assert valid.sum() > 10_000
    deq = qa[:, valid] * scale + offset
    assert np.abs(deq - fa[:, valid]).max() <= scale / 2 + 4e-3  # half an int8 step + float16 rounding


def test_dem_only_scene(shared_dir: Path, tmp_path: Path) -> None:
    """A second modality on another grid and CRS: elevation (and its slope) alone feed Presto."""
    out = tmp_path / "dem.tif"
    r = run_cli(
        "run",
        "--scene",
        f"dem={shared_dir / 'data/copernicus-dem-N00-E006/dem.tif'}",
        "--model",
        "presto",
        "--zoom",
        "11",
        "--bbox",
        "6.30,0.30,6.40,0.40",
        "--date",
        "2020-02-19",
        "--executor",
        "local",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as src:
        emb = src.read(out_dtype="float32")  # GDAL >= 3.11 reads float16, whose sums overflow
    valid = ~np.isnan(emb[0])
    assert valid.mean() > 0.5
    # land and sea give different embeddings, so the elevation really reached the model
    assert emb[:, valid].std(axis=1).mean() > 0.05
