"""The cloud model over the whole sample scene, run once for the session by the job service on a
local Ray cluster (`whole_scene_clouds`, tests/conftest.py): a valid web-optimized COG on the tile
grid, covering the scene, with no seams, whose classes match an independent recomputation of the
blended windows. `tilefm run` on the local executor at other zooms, and the zoom it picks itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
import rasterio.warp
from affine import Affine
from conftest import WholeSceneRun, run_cli
from rasterio.enums import Resampling
from rasterio.warp import transform_geom
from rio_cogeo import cog_validate
from shapely.geometry import box, mapping, shape

from tilefm.grid import TILE_SIZE, TMS, resolution
from tilefm.models import get_card
from tilefm.models.windows import blend_weights
from tilefm.testing.seams import seam_report

#: the job service on a local Ray cluster, `tilefm run`; `slow` where a test uses `clouds`
pytestmark = pytest.mark.integration

ZOOM = 11
#: the cloudy north-east of the sample scene (lon/lat)
CLOUDY_BBOX = "-11.45,24.75,-11.0,25.25"
ORIGIN = TMS.xy_bounds(0, 0, ZOOM)  # the world's top-left tile


@pytest.fixture(scope="module")
def clouds(whole_scene_clouds: WholeSceneRun) -> Path:
    """The whole scene's cloud mask at zoom 11, fetched from the S3 server."""
    return whole_scene_clouds.cog


def test_the_default_zoom_follows_from_the_grid_the_model_sees(scene_dir: Path, tmp_path: Path) -> None:
    """No --zoom: the zoom whose pixels are no larger than the scene's own 100 m ones, which the
    model sees (the plan `tilefm run` prints first, here as --dry-run gives it)."""
    out = tmp_path / "c.tif"
    r = run_cli("run", "--scene", f"s2={scene_dir}", "--model", "ukis-csmask", "--out", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["zoom"] == ZOOM and f"zoom {ZOOM} by default" in plan["zoom_reason"], plan
    assert plan["grid_description"] == "EPSG:32629 100 m" and "EPSG:32629 100 m" in plan["zoom_reason"], plan
    assert not out.exists()


def test_cog_is_valid_and_web_aligned(clouds: Path) -> None:
    valid, errors, _ = cog_validate(str(clouds), quiet=True)
    assert valid, errors
    with rasterio.open(clouds) as src:
        assert src.crs.to_epsg() == 3857
        assert src.res == pytest.approx((resolution(ZOOM), resolution(ZOOM)), rel=1e-12)
        # origin on the tile grid: a whole number of tiles from the world's top-left corner
        col = (src.transform.c - ORIGIN.left) / (TILE_SIZE * src.res[0])
        row = (ORIGIN.top - src.transform.f) / (TILE_SIZE * src.res[1])
        assert abs(col - round(col)) < 1e-9 and abs(row - round(row)) < 1e-9
        assert src.width % TILE_SIZE == 0 and src.height % TILE_SIZE == 0
        assert (src.block_shapes[0]) == (TILE_SIZE, TILE_SIZE)
        assert src.overviews(1), "no overviews"
        assert src.dtypes[0] == "uint8" and src.nodata == 255
        assert src.colormap(1)[1][:3] == (0xF5, 0xF5, 0xF5)
        assert src.tags()["TILEFM_MODEL"] == "ukis-csmask"
        assert src.tags()["TILEFM_INFERENCE_GRID"] == "EPSG:32629 100 m"
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"


def test_covers_the_whole_footprint(clouds: Path, scene_dir: Path) -> None:
    with rasterio.open(scene_dir / "B02.tif") as s2:
        footprint = shape(transform_geom(s2.crs, "EPSG:3857", mapping(box(*s2.bounds).segmentize(1000))))
    with rasterio.open(clouds) as src:
        classes = src.read(1)
        bounds = box(*src.bounds)
        assert bounds.contains(footprint)
        # every output pixel whose centre is well inside the footprint has a class
        inner = footprint.buffer(-2 * src.res[0])
        rows, cols = np.mgrid[0 : src.height : 7, 0 : src.width : 7]
        xs, ys = rasterio.transform.xy(src.transform, rows.ravel(), cols.ravel())
        from shapely import contains_xy

        inside = contains_xy(inner, np.asarray(xs), np.asarray(ys))
        assert inside.sum() > 10_000
        assert (classes[rows.ravel()[inside], cols.ravel()[inside]] != 255).all()
        # and nothing is made up outside it
        outer = footprint.buffer(2 * src.res[0])
        outside = ~contains_xy(outer, np.asarray(xs), np.asarray(ys))
        assert (classes[rows.ravel()[outside], cols.ravel()[outside]] == 255).all()
        values = set(np.unique(classes)) - {255}
        assert values <= {0, 1, 2} and {0, 1} <= values


def test_no_seams(clouds: Path) -> None:
    with rasterio.open(clouds) as src:
        report = seam_report(src.read(1))
    print(json.dumps(report.as_dict()))
    assert report.edge_ratio <= 1.2, report.as_dict()
    for period, score in report.stripe.items():
        assert score <= 1.2, f"stripe at period {period}: {report.as_dict()}"


def _grid_probs(
    scene_dir: Path, session: ort.InferenceSession, rows: tuple[int, int], cols: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """An independent blend on the scene's own 100 m grid, read straight from the band files:
    every window of the documented lattice (starts at k * stride - (window - stride) / 2) that
    touches grid pixels rows x cols, Hann-weighted. Returns (weighted sums [3, h, w], weights [h, w])
    over the span of those windows, and its grid origin."""
    card = get_card("ukis-csmask")
    ctx = card.context
    window, stride = ctx.window, ctx.stride
    anchor = (window - stride) // 2
    first_r = -((window - 1 - rows[0] - anchor) // stride)
    first_c = -((window - 1 - cols[0] - anchor) // stride)
    last_r, last_c = (rows[1] - 1 + anchor) // stride, (cols[1] - 1 + anchor) // stride
    r0, c0 = first_r * stride - anchor, first_c * stride - anchor
    h, w = (last_r - first_r) * stride + window, (last_c - first_c) * stride + window
    bands = []
    for b in card.inputs[0].bands:
        with rasterio.open(scene_dir / f"{b.name}.tif") as src:
            f = 1098 // src.width  # 20 m bands (200 m here): each pixel repeated f x f
            full = src.read(1, out_shape=(1098, 1098), resampling=Resampling.nearest).astype(np.float32)
            assert f in (1, 2)
        bands.append(((full * b.scale - b.mean) / b.std, full > 0))
    norm = np.stack([x for x, _ in bands])
    ok = np.logical_and.reduce([v for _, v in bands])
    assert r0 >= 0 and c0 >= 0 and r0 + h <= 1098 and c0 + w <= 1098, (
        "the block must be well inside the scene"
    )
    norm, ok = norm[:, r0 : r0 + h, c0 : c0 + w] * ok[r0 : r0 + h, c0 : c0 + w], ok[r0 : r0 + h, c0 : c0 + w]
    weights = blend_weights(window, ctx.overlap, ctx.blend)
    acc = np.zeros((3, h, w), np.float64)
    wsum = np.zeros((h, w), np.float64)
    for i in range(0, h - window + 1, stride):
        for j in range(0, w - window + 1, stride):
            logits = session.run(
                None, {"input": norm[None, :, i : i + window, j : j + window].astype(np.float32)}
            )[0][0]
            e = np.exp(logits - logits.max(0))
            wv = weights * ok[i : i + window, j : j + window]
            acc[:, i : i + window, j : j + window] += e / e.sum(0) * wv
            wsum[i : i + window, j : j + window] += wv
    return acc, wsum, (r0, c0)


def test_classes_match_an_independent_blend(clouds: Path, scene_dir: Path, model_store: Path) -> None:
    """Recompute a block of output pixels from the windows on the scene's own grid that cover it,
    read straight from the band files (not through tilefm), put onto the output grid by GDAL's
    warper, and compare classes."""
    session = ort.InferenceSession(
        str(model_store / "ukis-csmask-6b-l2a" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    with rasterio.open(clouds) as src, rasterio.open(scene_dir / "B02.tif") as b02:
        classes = src.read(1)
        cy, cx = classes.shape[0] // 2, classes.shape[1] // 2
        block = (slice(cy, cy + 64), slice(cx, cx + 64))
        dst_transform = src.transform @ Affine.translation(cx, cy)
        # the grid pixels under the block, and a margin for the bilinear kernel
        left, top = dst_transform @ (0, 0)
        right, bottom = dst_transform @ (64, 64)
        xs, ys = rasterio.warp.transform(
            src.crs, b02.crs, [left, right, left, right], [top, top, bottom, bottom]
        )
        pts = [~b02.transform @ (x, y) for x, y in zip(xs, ys, strict=True)]
        rows = (int(min(p[1] for p in pts)) - 3, int(max(p[1] for p in pts)) + 4)
        cols = (int(min(p[0] for p in pts)) - 3, int(max(p[0] for p in pts)) + 4)
        acc, wsum, (r0, c0) = _grid_probs(scene_dir, session, rows, cols)
        stack = np.concatenate([acc, wsum[None]]).astype(np.float32)
        out = np.zeros((4, 64, 64), np.float32)
        rasterio.warp.reproject(
            stack,
            out,
            src_transform=b02.transform @ Affine.translation(c0, r0),
            src_crs=b02.crs,
            dst_transform=dst_transform,
            dst_crs=src.crs,
            resampling=Resampling.bilinear,
        )
    blended = out[:3] / out[3]
    expected = blended.argmax(0)
    stored = classes[block]
    top2 = np.sort(blended, axis=0)
    clear_margin = (top2[-1] - top2[-2]) > 0.02
    assert clear_margin.mean() > 0.9
    agree = (stored == expected)[clear_margin].mean()
    assert agree >= 0.999, f"only {agree:.4f} of confidently classified pixels agree"


def _scl_agreement(cog: Path, scene_dir: Path) -> tuple[float, float, float]:
    """Cloud-vs-not agreement of a class map with ESA's Scene Classification (SCL 8, 9, 10 =
    cloud; SCL put onto the map's grid by nearest neighbour; SCL 0 = no data, left out), and the
    cloud shares of both."""
    with rasterio.open(cog) as src, rasterio.open(scene_dir / "SCL.tif") as scl_src:
        classes = src.read(1)
        scl = np.zeros(classes.shape, np.uint8)
        rasterio.warp.reproject(
            rasterio.band(scl_src, 1),
            scl,
            dst_transform=src.transform,
            dst_crs=src.crs,
            resampling=Resampling.nearest,
            src_nodata=0,
            dst_nodata=0,
        )
    m = (scl > 0) & (classes != 255)
    assert m.sum() > 100_000
    ref, got = np.isin(scl, [8, 9, 10])[m], (classes == 1)[m]
    return float((ref == got).mean()), float(got.mean()), float(ref.mean())


def test_clouds_agree_with_esa_scene_classification(clouds: Path, scene_dir: Path) -> None:
    """ESA's own classification of this scene is the oracle: the model, shown the scene's own
    pixels, finds the clouds SCL finds (a model shown bilinear-upsampled tiles called two thirds
    of this desert cloud)."""
    agree, ours, esa = _scl_agreement(clouds, scene_dir)
    print(json.dumps({"agreement": agree, "cloud_share": ours, "scl_cloud_share": esa}))
    assert agree >= 0.93
    assert abs(ours - esa) <= 0.05


@pytest.mark.parametrize("zoom", [10, 12])
def test_clouds_agree_with_scl_at_other_zooms(zoom: int, tmp_path: Path, scene_dir: Path) -> None:
    """The answer does not depend on the zoom it is shown at (the cloudy north-east of the scene)."""
    out = tmp_path / f"clouds-{zoom}.tif"
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "ukis-csmask",
        "--zoom",
        str(zoom),
        "--bbox",
        CLOUDY_BBOX,
        "--executor",
        "local",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    agree, ours, esa = _scl_agreement(out, scene_dir)
    print(json.dumps({"zoom": zoom, "agreement": agree, "cloud_share": ours, "scl_cloud_share": esa}))
    assert esa > 0.05  # the area holds clouds to find
    assert agree >= 0.90


def test_stac_item_beside_the_cog(whole_scene_clouds: WholeSceneRun) -> None:
    assert whole_scene_clouds.stac_uri == whole_scene_clouds.cog_uri.removesuffix(".tif") + ".stac.json"
    item = json.loads(whole_scene_clouds.stac.read_text())
    assert item["type"] == "Feature" and item["stac_version"] == "1.0.0"
    assert item["properties"]["proj:epsg"] == 3857
    assert item["properties"]["tilefm:model"] == "ukis-csmask"
    assert item["properties"]["tilefm:inference_grid"] == "EPSG:32629 100 m"
    assert item["properties"]["datetime"].startswith("2020-02-19")
    asset = item["assets"]["data"]
    assert asset["href"] == whole_scene_clouds.cog_uri and "cloud-optimized" in asset["type"]
    assert [c["value"] for c in asset["classification:classes"]] == [0, 1, 2]
    g = shape(item["geometry"])
    assert g.is_valid and g.bounds[0] == pytest.approx(-11.98, abs=0.05)
