"""Tile plans on the WebMercatorQuad grid: which XYZ tiles a job covers, and the mosaic they fill.

The mosaic is the bounding box of the planned tiles: its origin is a tile corner, its pixel size
the zoom's, and its 256-pixel internal blocks are exactly the XYZ tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import morecantile
import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from tilefm.errors import BBoxError, PlanError, ZoomError

TMS = morecantile.tms.get("WebMercatorQuad")
TILE_SIZE = 256
MIN_ZOOM, MAX_ZOOM = 0, 22
#: the smallest overview of an output is at most this many pixels across
MIN_OVERVIEW_SIZE = 256

_lonlat_to_3857 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)


def to_3857(geom: BaseGeometry) -> BaseGeometry:
    """A lon/lat geometry in web-mercator metres."""
    return shapely.transform(geom, lambda xy: np.column_stack(_lonlat_to_3857.transform(xy[:, 0], xy[:, 1])))


def resolution(zoom: int) -> float:
    """Metres per pixel of WebMercatorQuad at `zoom` (at the equator)."""
    return TMS.matrix(zoom).cellSize


def default_zoom(ground_resolution_m: float, latitude: float) -> int:
    """The coarsest zoom whose pixels are no larger than the native ground resolution."""
    mercator = ground_resolution_m / max(math.cos(math.radians(latitude)), 1e-6)
    for z in range(MIN_ZOOM, MAX_ZOOM + 1):
        if resolution(z) <= mercator * 1.0001:
            return z
    return MAX_ZOOM


@dataclass(frozen=True)
class Tile:
    x: int
    y: int
    z: int

    def __str__(self) -> str:
        return f"{self.z}/{self.x}/{self.y}"


@dataclass
class TilePlan:
    """The tiles of one job at one zoom, ordered row by row, and the mosaic grid that holds them."""

    zoom: int
    tiles: list[Tile]
    #: tile index ranges of the mosaic (inclusive)
    x_range: tuple[int, int]
    y_range: tuple[int, int]
    overview_levels: int
    footprint: BaseGeometry = field(repr=False)

    @property
    def width(self) -> int:
        return (self.x_range[1] - self.x_range[0] + 1) * TILE_SIZE

    @property
    def height(self) -> int:
        return (self.y_range[1] - self.y_range[0] + 1) * TILE_SIZE

    @property
    def transform(self) -> Affine:
        b = TMS.xy_bounds(morecantile.Tile(self.x_range[0], self.y_range[0], self.zoom))
        res = resolution(self.zoom)
        return Affine(res, 0.0, b.left, 0.0, -res, b.top)

    @property
    def bounds_3857(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f - self.height * abs(t.e), t.c + self.width * t.a, t.f)

    def offset(self, tile: Tile) -> tuple[int, int]:
        """Pixel (row, col) of a tile's top-left corner in the mosaic."""
        return (tile.y - self.y_range[0]) * TILE_SIZE, (tile.x - self.x_range[0]) * TILE_SIZE

    def coarsen(self, k: int) -> TilePlan:
        """The parents `k` zooms up of the planned tiles: the mosaic of an output whose pixels
        are 2^k of the tiles' pixels (per-patch outputs: 16-pixel patches, k = 4)."""
        if k == 0:
            return self
        if k > self.zoom:
            raise PlanError(f"zoom {self.zoom} has no parents {k} levels up", field="zoom")
        tiles = sorted(
            {Tile(t.x >> k, t.y >> k, self.zoom - k) for t in self.tiles}, key=lambda t: (t.y, t.x)
        )
        return _plan(tiles, self.zoom - k, self.footprint)

    def summary(self) -> dict[str, Any]:
        res = resolution(self.zoom)
        area_km2 = len(self.tiles) * (TILE_SIZE * res / 1000) ** 2
        return {
            "zoom": self.zoom,
            "tiles": len(self.tiles),
            "pixel_size_m": round(res, 3),
            "mosaic": [self.width, self.height],
            "overview_levels": self.overview_levels,
            "area_km2_mercator": round(area_km2, 1),
            "bounds_3857": [round(v, 3) for v in self.bounds_3857],
        }


def check_bbox(
    bbox: Sequence[float], *, allow_empty: bool = False, label: str | None = None
) -> tuple[float, float, float, float]:
    """A WGS84 box checked: four finite numbers minlon, minlat, maxlon, maxlat within
    -180..180 / -90..90, not inverted.

    Args:
        bbox: minlon, minlat, maxlon, maxlat in degrees.
        allow_empty: accept a box of zero width or height (planning refuses it later, as a box
            that does not intersect the scene); otherwise min < max is required.
        label: how the box is named in the error (default: its numbers).

    Returns:
        The box as a tuple of floats.

    Raises:
        BBoxError: not four numbers, NaN or infinite, out of range, or inverted.
    """
    name = label or ",".join(map(str, bbox))
    if len(bbox) != 4:
        raise BBoxError(f"expected four numbers minlon,minlat,maxlon,maxlat, got {name}")
    w, s, e, n = (float(v) for v in bbox)
    # NaN compares false with everything and infinities are out of range: both fail here
    inside = -180 <= w <= e <= 180 and -90 <= s <= n <= 90
    if not inside or (not allow_empty and (w == e or s == n)):
        raise BBoxError(
            f"{name} is not a valid lon/lat box (need finite -180<=minlon<maxlon<=180, "
            "-90<=minlat<maxlat<=90)"
        )
    return w, s, e, n


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """`minlon,minlat,maxlon,maxlat` in WGS84 degrees."""
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise BBoxError(f"expected four numbers minlon,minlat,maxlon,maxlat, got {text!r}") from None
    return check_bbox(vals, label=repr(text))


def plan_tiles(
    footprint: BaseGeometry,
    zoom: int,
    *,
    bbox: tuple[float, float, float, float] | None = None,
    max_tiles: int | None = None,
) -> TilePlan:
    """Tiles at `zoom` that intersect the footprint (lon/lat), clipped to `bbox` if given."""
    if not isinstance(zoom, int) or not (MIN_ZOOM <= zoom <= MAX_ZOOM):
        raise ZoomError(f"zoom {zoom} is outside {MIN_ZOOM}..{MAX_ZOOM}")
    area = footprint
    if bbox is not None:
        area = footprint.intersection(box(*bbox))
        if area.is_empty or area.area == 0:
            fb = ",".join(f"{v:.4f}" for v in footprint.bounds)
            raise BBoxError(f"{','.join(map(str, bbox))} does not intersect the scene footprint ({fb})")
    if area.is_empty:
        raise PlanError("the scene footprint is empty")
    area_3857 = to_3857(area)
    xs, ys = _tile_range(area_3857.bounds, zoom)
    n_candidates = len(xs) * len(ys)
    if max_tiles is not None and n_candidates > 4 * max_tiles:
        raise PlanError(
            f"the area needs about {n_candidates} tiles at zoom {zoom}, over the limit of {max_tiles}",
            field="zoom",
        )
    tiles = [Tile(int(x), int(y), zoom) for x, y in _covering(xs, ys, zoom, area_3857)]
    if not tiles:
        raise PlanError(f"no tile at zoom {zoom} intersects the scene")
    if max_tiles is not None and len(tiles) > max_tiles:
        raise PlanError(
            f"the area needs {len(tiles)} tiles at zoom {zoom}, over the limit of {max_tiles}; "
            "use a lower zoom or a smaller --bbox",
            field="zoom",
        )
    tiles.sort(key=lambda t: (t.y, t.x))
    return _plan(tiles, zoom, area)


def tile_span(zoom: int) -> tuple[float, float, float]:
    """The grid's origin (x, y) and one tile's width in metres at `zoom`."""
    m = TMS.matrix(zoom)
    ox, oy = m.pointOfOrigin
    return ox, oy, m.cellSize * m.tileWidth


def _tile_range(bounds: tuple[float, float, float, float], zoom: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and rows of the tiles whose closed extent meets web-mercator `bounds` (edge
    neighbours included: `_covering` drops those that share only an edge)."""
    ox, oy, span = tile_span(zoom)
    minx, miny, maxx, maxy = bounds
    last = 2**zoom - 1
    x0, x1 = (min(max(math.floor((v - ox) / span), 0), last) for v in (minx, maxx))
    y0, y1 = (min(max(math.floor((oy - v) / span), 0), last) for v in (maxy, miny))
    return np.arange(x0, x1 + 1), np.arange(y0, y1 + 1)


def _covering(xs: np.ndarray, ys: np.ndarray, zoom: int, area_3857: BaseGeometry) -> list[tuple[int, int]]:
    """The (x, y) of the candidate tiles that overlap `area_3857` with a positive area, in one
    vectorised pass (a scene at zoom 14 has thousands of candidates)."""
    ox, oy, span = tile_span(zoom)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    cells = shapely.box(ox + gx * span, oy - (gy + 1) * span, ox + (gx + 1) * span, oy - gy * span)
    shapely.prepare(area_3857)
    hit = shapely.intersects(area_3857, cells)
    hit[hit] = shapely.area(shapely.intersection(cells[hit], area_3857)) > 0
    return list(zip(gx[hit].tolist(), gy[hit].tolist(), strict=True))


def _plan(tiles: list[Tile], zoom: int, area: BaseGeometry) -> TilePlan:
    xs = [t.x for t in tiles]
    ys = [t.y for t in tiles]
    span = max(max(xs) - min(xs), max(ys) - min(ys)) + 1
    levels = 0
    while (span * TILE_SIZE) >> (levels + 1) >= MIN_OVERVIEW_SIZE and levels < zoom:
        levels += 1
    x_range = (min(xs), max(xs))
    y_range = (min(ys), max(ys))
    return TilePlan(
        zoom=zoom,
        tiles=tiles,
        x_range=x_range,
        y_range=y_range,
        overview_levels=levels,
        footprint=area,
    )
