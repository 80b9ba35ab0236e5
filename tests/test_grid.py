"""Tile plans on the WebMercatorQuad grid (tilefm.grid), on the real Sentinel-2 scene's footprint."""

from __future__ import annotations

import math
from pathlib import Path

import morecantile
import pytest
from shapely.geometry import box
from shapely.ops import unary_union

from tilefm.errors import BBoxError, PlanError, ZoomError
from tilefm.grid import (
    MAX_ZOOM,
    MIN_OVERVIEW_SIZE,
    TILE_SIZE,
    TMS,
    Tile,
    default_zoom,
    parse_bbox,
    plan_tiles,
    resolution,
    to_3857,
)
from tilefm.io.scene import open_scene

#: WebMercatorQuad pixel size at zoom 0 (equator): 2 pi R / 256
RES0 = 2 * math.pi * 6378137.0 / 256


@pytest.fixture(scope="module")
def footprint(scene_dir: Path):
    return open_scene({"s2": str(scene_dir)}).footprint


def _cell(t: Tile):
    b = TMS.xy_bounds(morecantile.Tile(t.x, t.y, t.z))
    return box(b.left, b.bottom, b.right, b.top)


# --------------------------------------------------------------------------------------------
# resolution and default zoom


def test_resolution():
    for z in range(0, MAX_ZOOM + 1):
        assert resolution(z) == pytest.approx(RES0 / 2**z, rel=1e-12)
    assert resolution(10) == pytest.approx(152.874, abs=1e-3)
    assert resolution(11) == pytest.approx(76.437, abs=1e-3)
    assert resolution(13) == pytest.approx(19.109, abs=1e-3)
    assert resolution(14) == pytest.approx(9.555, abs=1e-3)


def test_default_zoom_examples():
    """The rule: the coarsest zoom whose pixel, on the ground at that latitude
    (resolution(z) * cos(lat)), is no larger than the native ground resolution.

    100 m at 24.8 N (the real scene): a mercator pixel of 100 / cos(24.8) = 110.16 m is needed;
    zoom 10 has 152.87 m (too coarse), zoom 11 76.44 m -> 11.
    10 m at the equator: zoom 13 has 19.11 m, zoom 14 9.55 m -> 14.
    """
    assert 100 / math.cos(math.radians(24.8)) == pytest.approx(110.16, abs=0.01)
    assert resolution(10) > 110.16 >= resolution(11)
    assert default_zoom(100, 24.8) == 11
    assert resolution(13) > 10 >= resolution(14)
    assert default_zoom(10, 0) == 14
    # the real scene's own numbers give the same
    assert default_zoom(100.0, 24.80) == 11
    # mercator pixels shrink on the ground towards the poles (cos(60) = 1/2): 100 m at 60 N needs
    # a 200 m mercator pixel, which zoom 10 (152.9 m) gives and zoom 9 (305.7 m) does not
    assert default_zoom(100, 60) == 10
    assert default_zoom(100, -60) == 10
    # exactly a zoom's pixel size picks that zoom, a hair coarser too (1e-4 slack)
    assert default_zoom(resolution(12), 0) == 12
    assert default_zoom(resolution(12) * 0.99995, 0) == 12
    # the ends of the range
    assert default_zoom(1e6, 0) == 0
    assert default_zoom(0.001, 0) == MAX_ZOOM


@pytest.mark.parametrize("lat", [0.0, 24.8, -45.0, 70.0])
@pytest.mark.parametrize("res_m", [0.5, 10.0, 20.0, 60.0, 100.0, 250.0, 1000.0])
def test_default_zoom_rule(res_m: float, lat: float):
    z = default_zoom(res_m, lat)

    def ground(zz: int) -> float:
        return resolution(zz) * math.cos(math.radians(lat))

    assert ground(z) <= res_m * 1.0001  # fine enough
    assert z == 0 or ground(z - 1) > res_m  # and the coarsest such


# --------------------------------------------------------------------------------------------
# plans


@pytest.mark.parametrize("zoom,n_tiles,levels", [(10, 20, 2), (11, 56, 3)])
def test_plan_covers_footprint(footprint, zoom: int, n_tiles: int, levels: int):
    plan = plan_tiles(footprint, zoom)
    fp = to_3857(footprint)
    assert len(plan.tiles) == n_tiles
    assert len(set(plan.tiles)) == len(plan.tiles)
    assert all(t.z == zoom for t in plan.tiles)
    # every tile intersects the footprint (with area, not only a shared edge)
    for t in plan.tiles:
        assert _cell(t).intersection(fp).area > 0, t
    # the tiles cover the footprint completely
    union = unary_union([_cell(t) for t in plan.tiles])
    assert fp.difference(union).area <= 1e-9 * fp.area
    # a tile just outside the plan does not touch the footprint with area
    xs, ys = plan.x_range, plan.y_range
    for t in (Tile(xs[0] - 1, ys[0], zoom), Tile(xs[1] + 1, ys[1], zoom), Tile(xs[0], ys[1] + 1, zoom)):
        assert _cell(t).intersection(fp).area == 0
    # row-major order: by row (y), then column (x)
    assert plan.tiles == sorted(plan.tiles, key=lambda t: (t.y, t.x))
    assert xs == (min(t.x for t in plan.tiles), max(t.x for t in plan.tiles))
    assert ys == (min(t.y for t in plan.tiles), max(t.y for t in plan.tiles))

    # the mosaic: origin exactly the top-left tile's corner, pixel size the zoom's
    tl = TMS.xy_bounds(morecantile.Tile(xs[0], ys[0], zoom))
    tr = plan.transform
    assert tr.c == tl.left and tr.f == tl.top
    assert tr.a == resolution(zoom) and tr.e == -resolution(zoom)
    assert tr.b == 0 and tr.d == 0
    assert plan.width == (xs[1] - xs[0] + 1) * TILE_SIZE
    assert plan.height == (ys[1] - ys[0] + 1) * TILE_SIZE
    br = TMS.xy_bounds(morecantile.Tile(xs[1], ys[1], zoom))
    w, s, e, n = plan.bounds_3857
    assert (w, n) == (tl.left, tl.top)
    assert e == pytest.approx(br.right, abs=1e-6) and s == pytest.approx(br.bottom, abs=1e-6)
    # each tile's block in the mosaic is exactly the tile
    for t in plan.tiles:
        row, col = plan.offset(t)
        assert row % TILE_SIZE == 0 and col % TILE_SIZE == 0
        b = TMS.xy_bounds(morecantile.Tile(t.x, t.y, zoom))
        x0, y0 = tr @ (col, row)
        x1, y1 = tr @ (col + TILE_SIZE, row + TILE_SIZE)
        assert (x0, y0, x1, y1) == pytest.approx((b.left, b.top, b.right, b.bottom), abs=1e-6)

    # overviews: halve while the smallest level keeps at least 256 pixels across
    assert plan.overview_levels == levels
    size = max(plan.width, plan.height)
    assert size >> plan.overview_levels >= MIN_OVERVIEW_SIZE
    assert size >> (plan.overview_levels + 1) < MIN_OVERVIEW_SIZE
    assert plan.overview_levels <= zoom

    s = plan.summary()
    assert s["tiles"] == n_tiles and s["mosaic"] == [plan.width, plan.height]
    assert s["pixel_size_m"] == round(resolution(zoom), 3)


def test_plan_single_tile_has_no_overviews(footprint):
    plan = plan_tiles(footprint, 4)
    assert len(plan.tiles) == 1 and plan.overview_levels == 0
    assert plan.width == plan.height == TILE_SIZE


def test_plan_bbox_clips(footprint):
    full = plan_tiles(footprint, 11)
    bbox = parse_bbox("-11.6,24.6,-11.3,24.9")
    plan = plan_tiles(footprint, 11, bbox=bbox)
    assert 0 < len(plan.tiles) < len(full.tiles)
    assert set(plan.tiles) <= set(full.tiles)
    area = to_3857(footprint.intersection(box(*bbox)))
    assert plan.footprint.equals(footprint.intersection(box(*bbox)))
    for t in plan.tiles:
        assert _cell(t).intersection(area).area > 0
    assert area.difference(unary_union([_cell(t) for t in plan.tiles])).area <= 1e-9 * area.area
    assert plan.tiles == sorted(plan.tiles, key=lambda t: (t.y, t.x))
    # a bbox larger than the scene changes nothing
    assert plan_tiles(footprint, 11, bbox=(-20, 20, 0, 30)).tiles == full.tiles


def test_plan_bbox_outside(footprint):
    with pytest.raises(BBoxError, match="does not intersect the scene footprint") as e:
        plan_tiles(footprint, 11, bbox=(6.0, 0.0, 7.0, 1.0))
    msg = str(e.value)
    assert e.value.field == "bbox" and msg.startswith("bbox: ")
    w, s, east, n = footprint.bounds
    assert f"{w:.4f},{s:.4f},{east:.4f},{n:.4f}" in msg  # names the footprint
    assert "6.0,0.0,7.0,1.0" in msg  # and the bbox
    # touching only along an edge is no intersection either
    with pytest.raises(BBoxError):
        plan_tiles(footprint, 11, bbox=(w - 1, s, w, n))


def test_parse_bbox():
    assert parse_bbox("-11.6,24.6,-11.3,24.9") == (-11.6, 24.6, -11.3, 24.9)
    assert parse_bbox(" -11.6, 24.6 ,-11.3,24.9") == (-11.6, 24.6, -11.3, 24.9)
    for text, match in [
        ("1,2,3", "expected four numbers"),
        ("1,2,3,4,5", "expected four numbers"),
        ("west,south,east,north", "expected four numbers"),
        ("", "expected four numbers"),
        ("10,0,5,1", "not a valid lon/lat box"),  # minlon > maxlon
        ("0,10,1,5", "not a valid lon/lat box"),  # minlat > maxlat
        ("0,0,0,1", "not a valid lon/lat box"),  # empty
        ("-181,0,1,1", "not a valid lon/lat box"),
        ("0,-91,1,1", "not a valid lon/lat box"),
    ]:
        with pytest.raises(BBoxError, match=match) as e:
            parse_bbox(text)
        assert e.value.field == "bbox" and repr(text) in str(e.value)


@pytest.mark.parametrize("zoom", [-1, 23, 100])
def test_zoom_out_of_range(footprint, zoom: int):
    with pytest.raises(ZoomError, match=f"zoom {zoom} is outside 0..22") as e:
        plan_tiles(footprint, zoom)
    assert e.value.field == "zoom" and isinstance(e.value, PlanError)


def test_zoom_range_ends(footprint):
    assert len(plan_tiles(footprint, 0).tiles) == 1
    with pytest.raises(ZoomError):
        plan_tiles(footprint, 11.0)  # not an integer zoom


@pytest.mark.parametrize("max_tiles", [10, 50])
def test_max_tiles(footprint, max_tiles: int):
    # 10: the candidate box (56) is over 4x the limit, refused before testing tiles; 50: after
    with pytest.raises(PlanError, match="over the limit") as e:
        plan_tiles(footprint, 11, max_tiles=max_tiles)
    assert e.value.field == "zoom" and "56" in str(e.value) and str(max_tiles) in str(e.value)
    assert len(plan_tiles(footprint, 11, max_tiles=56).tiles) == 56


def test_empty_footprint():
    with pytest.raises(PlanError, match="empty"):
        plan_tiles(box(0, 0, 1, 1).intersection(box(2, 2, 3, 3)), 5)
