"""The cloud model over the whole sample scene, through the CLI on a local Ray cluster: a valid
web-optimized COG on the tile grid, covering the scene, with no seams, whose classes match an
independent recomputation of the blended windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rio_cogeo import cog_validate
from shapely.geometry import box, shape
from shapely.geometry import mapping
from rasterio.warp import transform_geom

from conftest import run_cli
from tilefm.grid import TMS, TILE_SIZE, resolution
from tilefm.models import get_card
from tilefm.read import WARP_TOLERANCE
from tilefm.seams import seam_report
from tilefm.windows import blend_weights

ZOOM = 11
ORIGIN = TMS.xy_bounds(0, 0, ZOOM)  # the world's top-left tile


@pytest.fixture(scope="module")
def clouds(tmp_path_factory, scene_dir: Path, output_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("clouds") / "clouds.tif"
    r = run_cli("run", "--scene", f"s2={scene_dir}", "--model", "ukis-csmask", "--zoom", str(ZOOM), "--out", f"file://{out}")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr
    return out


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


def _window_probs(scene_dir: Path, session: ort.InferenceSession, gx: int, gy: int) -> tuple[np.ndarray, np.ndarray]:
    """An independent read of one 256-px window at global pixel (gx, gy) and the model's probabilities."""
    card = get_card("ukis-csmask")
    res = resolution(ZOOM)
    transform = Affine(res, 0, ORIGIN.left + gx * res, 0, -res, ORIGIN.top - gy * res)
    bands = []
    for b in card.inputs[0].bands:
        with rasterio.open(scene_dir / f"{b.name}.tif") as src, WarpedVRT(
            src, crs="EPSG:3857", transform=transform, width=256, height=256, resampling=Resampling.bilinear,
            tolerance=WARP_TOLERANCE,
        ) as vrt:
            bands.append((vrt.read(1).astype(np.float32) * b.scale - b.mean) / b.std)
    logits = session.run(None, {"input": np.stack(bands)[None]})[0][0]
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0), np.ones((256, 256), bool)


def test_classes_match_an_independent_blend(clouds: Path, scene_dir: Path, model_store: Path) -> None:
    """Recompute a block of pixels from the 4x4 windows that cover it, read straight from the
    band files with GDAL's warper (not through tilefm), and compare classes."""
    ctx = get_card("ukis-csmask").context
    stride, halo = ctx.stride, ctx.halo
    session = ort.InferenceSession(str(model_store / "ukis-csmask-6b-l2a" / "model.onnx"), providers=["CPUExecutionProvider"])
    weights = blend_weights(ctx.window, ctx.overlap, ctx.blend)
    with rasterio.open(clouds) as src:
        classes = src.read(1)
        x0 = round((src.transform.c - ORIGIN.left) / src.res[0])
        y0 = round((ORIGIN.top - src.transform.f) / src.res[1])
    # a 64x64 block in the middle of the scene, on the window grid (global windows start at -halo + k*stride)
    cy, cx = classes.shape[0] // 2, classes.shape[1] // 2
    by = ((y0 + cy + halo) // stride) * stride - halo
    bx = ((x0 + cx + halo) // stride) * stride - halo
    acc = np.zeros((3, stride, stride), np.float64)
    wsum = np.zeros((stride, stride), np.float64)
    n_windows = ctx.window // stride
    for ky in range(n_windows):
        for kx in range(n_windows):
            oy, ox = by - ky * stride, bx - kx * stride  # window origins covering the block
            probs, _ = _window_probs(scene_dir, session, ox, oy)
            sl = (slice(ky * stride, (ky + 1) * stride), slice(kx * stride, (kx + 1) * stride))
            acc += probs[(slice(None), *sl)] * weights[sl]
            wsum += weights[sl]
    blended = acc / wsum
    expected = blended.argmax(0)
    stored = classes[by - y0 : by - y0 + stride, bx - x0 : bx - x0 + stride]
    top2 = np.sort(blended, axis=0)
    clear_margin = (top2[-1] - top2[-2]) > 0.02
    assert clear_margin.mean() > 0.9
    agree = (stored == expected)[clear_margin].mean()
    assert agree >= 0.999, f"only {agree:.4f} of confidently classified pixels agree"


def test_stac_item_beside_the_cog(clouds: Path) -> None:
    item = json.loads(clouds.with_name("clouds.stac.json").read_text())
    assert item["type"] == "Feature" and item["stac_version"] == "1.0.0"
    assert item["properties"]["proj:epsg"] == 3857
    assert item["properties"]["tilefm:model"] == "ukis-csmask"
    assert item["properties"]["datetime"].startswith("2020-02-19")
    asset = item["assets"]["data"]
    assert asset["href"].endswith("clouds.tif") and "cloud-optimized" in asset["type"]
    assert [c["value"] for c in asset["classification:classes"]] == [0, 1, 2]
    g = shape(item["geometry"])
    assert g.is_valid and g.bounds[0] == pytest.approx(-11.98, abs=0.05)
