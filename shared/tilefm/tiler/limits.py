"""What one tiler request may cost. Sizes and band counts are capped (`Limits`), each refused with
a 422 that names its parameter before anything is read; what a read costs (bands x pixels) is
checked where its size is known, since 128 bands make a modest preview hundreds of MiB.

The generic COG endpoints get the same treatment from `cog_guard` (the query, before TiTiler's
handlers run) and `LimitedReader` (each read, however TiTiler's parameters combined into it).

Why one module (~470 lines): every cap a tiler request meets, in one place, so that a cap added
to one route is seen next to the ones the others have.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from rasterio.warp import transform_bounds
from rio_tiler.constants import WGS84_CRS
from rio_tiler.expression import get_expression_blocks, parse_expression
from rio_tiler.io import Reader
from starlette.requests import Request

from tilefm.settings import Settings
from tilefm.tiler.errors import BadRenderParameter, LimitExceeded, TileNotAvailable

#: the longest query string a tiler route reads (a similarity vector of 1024 bands fits)
MAX_QUERY_CHARS = 32 * 1024
#: parameters the finite-number check leaves alone: a no-data value can be NaN; a dataset URL
#: and an API key are text (a file may be named "inf"), checked elsewhere
NOT_NUMBERS = frozenset({"nodata", "url", "api_key"})
#: /cog statistics: histogram bins (a count, or that many edges), percentiles, categories
MAX_HISTOGRAM_BINS = 1024
MAX_PERCENTILES = 100
MAX_CATEGORIES = 1024
#: /cog `expression=`: its length, in characters
MAX_EXPRESSION_CHARS = 1024
#: /cog tiles: the deepest zoom asked for (morecantile extrapolates any zoom; 30 is ~4 cm)
MAX_ZOOM = 30
FLOAT32 = 4
#: the longest side of previews and statistics asked for without a size (TiTiler's default)
DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class Limits:
    """The caps of one tiler process, from its settings."""

    max_bands: int
    max_tilesize: int
    max_preview_px: int
    max_statistics_px: int
    max_read_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_bands=settings.tiler_max_bands,
            max_tilesize=settings.tiler_max_tilesize,
            max_preview_px=settings.tiler_max_preview_px,
            max_statistics_px=settings.tiler_max_statistics_px,
            max_read_bytes=settings.tiler_max_read_mb * 1024 * 1024,
        )

    def check_bands(self, count: int, field: str) -> None:
        if count > self.max_bands:
            raise LimitExceeded(
                f"{count} bands asked for; this tiler reads at most {self.max_bands} named bands per request "
                "(TILEFM_TILER_MAX_BANDS)",
                field=field,
            )

    def check_size(self, value: int, cap: int, field: str, setting: str) -> None:
        if value > cap:
            raise LimitExceeded(f"{value} px is over this tiler's {cap} px ({setting})", field=field)

    def check_preview(self, value: int | None, field: str) -> None:
        if value is not None:
            self.check_size(value, self.max_preview_px, field, "TILEFM_TILER_MAX_PREVIEW_PX")

    def check_statistics(self, value: int | None, field: str) -> None:
        if value is not None:
            self.check_size(value, self.max_statistics_px, field, "TILEFM_TILER_MAX_STATISTICS_PX")

    def check_read(self, bands: int, height: int, width: int, field: str) -> None:
        """A read of `bands` x `height` x `width` float32 values fits the per-request budget."""
        need = bands * height * width * FLOAT32
        if need > self.max_read_bytes:
            mib = 1024 * 1024
            raise LimitExceeded(
                f"{bands} bands of {width} x {height} px are {need / mib:.0f} MiB, over the "
                f"{self.max_read_bytes // mib} MiB this tiler reads for one request "
                "(TILEFM_TILER_MAX_READ_MB): "
                "ask for fewer bands or fewer pixels",
                field=field,
            )

    def image_size(
        self, requested: int | None, *, statistics: bool, bands: int, height: int, width: int
    ) -> int:
        """The `max_size` of a preview or statistics of `bands` bands of a `height` x `width`
        raster: the one asked for, if it is within the caps (else a 422 naming max_size); none
        asked for, the default (1024) or the largest below it whose read fits the budget, so
        that many-band outputs get a smaller image rather than an error."""
        cap = self.max_statistics_px if statistics else self.max_preview_px
        if requested is not None:
            (self.check_statistics if statistics else self.check_preview)(requested, "max_size")
            self.check_read(bands, *fit(requested, height, width), "max_size")
            return requested
        size = min(DEFAULT_SIZE, cap)
        need = bands * math.prod(fit(size, height, width)) * FLOAT32
        if need > self.max_read_bytes:
            size = max(1, int(size * math.sqrt(self.max_read_bytes / need)))
            while size > 1 and bands * math.prod(fit(size, height, width)) * FLOAT32 > self.max_read_bytes:
                size -= 1
        return size


def fit(max_size: int, height: int, width: int) -> tuple[int, int]:
    """rio-tiler's preview size: the longest side `max_size`, the aspect kept; smaller kept as is."""
    if max(height, width) < max_size:
        return height, width
    if height > width:
        return max_size, math.ceil(max_size * width / height)
    return math.ceil(max_size * height / width), max_size


# ------------------------------------------------------------------------------------------------
# every route: numbers in the query and the path
# ------------------------------------------------------------------------------------------------


def _non_finite(value: str) -> str | None:
    """The first piece of `value` (split at commas and spaces: lists, and formulas such as
    `saturation 1.5`) that is a number but not a finite one."""
    for piece in re.split(r"[,\s]+", value):
        try:
            number = float(piece)
        except ValueError:
            continue
        if not math.isfinite(number):
            return piece.strip()
    return None


def check_finite(items: Iterable[tuple[str, Any]]) -> None:
    """Refuse NaN and infinities (`nan`, `inf`, `1e999`) wherever a number is read, before any
    handler compares or casts them (NaN passes every `<` check by failing it)."""
    for name, value in items:
        if name in NOT_NUMBERS or not isinstance(value, str):
            continue
        bad = _non_finite(value)
        if bad is not None:
            raise BadRenderParameter(f"{name} must be a finite number, not {bad!r}", field=name)


def request_guard(request: Request) -> None:
    """Every tiler data route: a bounded query string with finite numbers only, in it and in
    the path."""
    if len(request.url.query) > MAX_QUERY_CHARS:
        raise LimitExceeded(f"the query string is over {MAX_QUERY_CHARS} characters", field="query")
    check_finite(request.query_params.multi_items())
    check_finite(request.path_params.items())


# ------------------------------------------------------------------------------------------------
# the generic COG endpoints
# ------------------------------------------------------------------------------------------------


def _int(request: Request, name: str, source: dict | None = None) -> int | None:
    """A whole-number parameter (query, or `source`), or None; badly typed values are left to
    FastAPI's validation, which names them."""
    raw = (source if source is not None else request.query_params).get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        try:
            return math.ceil(float(raw))
        except ValueError:
            return None


def _float(request: Request, name: str, source: dict | None = None) -> float | None:
    raw = (source if source is not None else request.query_params).get(name)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def cog_guard(limits: Limits, request: Request) -> None:
    """The generic COG endpoints' query against the caps, before TiTiler reads anything."""
    q = request.query_params
    path = request.path_params
    bidx = q.getlist("bidx")
    limits.check_bands(len(bidx), "bidx")
    expression = q.get("expression")
    if expression is not None:
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise LimitExceeded(f"expression is over {MAX_EXPRESSION_CHARS} characters", field="expression")
        try:
            read, out = parse_expression(expression), get_expression_blocks(expression)
        except Exception as e:  # noqa: BLE001 - rio-tiler's InvalidExpression, a ValueError, whatever its parser raises
            raise BadRenderParameter(f"expression cannot be read: {e}", field="expression") from None
        limits.check_bands(max(len(read), len(out)), "expression")
    # tiles: the tile size with what buffer and padding add around it
    tilesize = _int(request, "tilesize")
    if tilesize is not None:
        limits.check_size(tilesize, limits.max_tilesize, "tilesize", "TILEFM_TILER_MAX_TILESIZE")
    base = tilesize or 256
    for name in ("buffer", "padding"):
        extra = _float(request, name)
        if extra is not None and extra > 0 and base + 2 * math.ceil(extra) > limits.max_tilesize:
            raise LimitExceeded(
                f"a {base} px tile with {name}={extra:g} is over this tiler's {limits.max_tilesize} px "
                "(TILEFM_TILER_MAX_TILESIZE)",
                field=name,
            )
    # images: preview, bbox, feature; statistics have their own cap
    check = (
        limits.check_statistics
        if request.url.path.rstrip("/").endswith("/statistics")
        else limits.check_preview
    )
    for name in ("max_size", "width", "height"):
        for value in (_int(request, name), _int(request, name, path)):
            if value is not None and value < 1:  # TiTiler would take 0 for "not given"
                raise BadRenderParameter(f"{name} must be at least 1 px, not {value}", field=name)
            check(value, name)
    for name in ("minzoom", "maxzoom"):
        value = _int(request, name)
        if value is not None and not 0 <= value <= MAX_ZOOM:
            raise BadRenderParameter(f"{name} must be between 0 and {MAX_ZOOM}, not {value}", field=name)
    _check_colormap(request)
    _check_statistics_options(request)
    _check_positions(request)


def _check_colormap(request: Request) -> None:
    """A JSON colormap parsed the way TiTiler will, so a malformed one is a 422 naming it rather
    than an error deep in the rendering."""
    raw = request.query_params.get("colormap")
    if raw is None:
        return
    from rio_tiler.colormap import parse_color
    from titiler.core.dependencies import ColorMapParams

    try:
        cmap = ColorMapParams(colormap_name=None, colormap=raw)
        if isinstance(cmap, dict):
            ok = all(isinstance(k, int) and 0 <= k < 2**16 for k in cmap)
        elif isinstance(cmap, list):
            ok = all(
                len(rng) == 2 and all(math.isfinite(float(b)) for b in rng) and len(parse_color(color)) == 4
                for rng, color in cmap
            )
        else:
            ok = cmap is None
    except Exception:  # noqa: BLE001 - TiTiler's HTTPException, or what its parser raises on odd JSON
        ok = False
    if not ok:
        raise BadRenderParameter(
            'colormap must be JSON: {"value": color, ...} or [[[min, max], color], ...]', field="colormap"
        )


def _check_statistics_options(request: Request) -> None:
    q = request.query_params
    bins = q.get("histogram_bins")
    if bins is not None:
        pieces = bins.split(",")
        count = len(pieces) if len(pieces) > 1 else _int(request, "histogram_bins")
        if count is not None and count > MAX_HISTOGRAM_BINS:
            raise LimitExceeded(
                f"histogram_bins asks for {count} bins; at most {MAX_HISTOGRAM_BINS}", field="histogram_bins"
            )
        if count is not None and count < 1:
            raise BadRenderParameter("histogram_bins must be at least 1", field="histogram_bins")
    percentiles = q.getlist("p")
    if len(percentiles) > MAX_PERCENTILES:
        raise LimitExceeded(f"{len(percentiles)} percentiles asked for; at most {MAX_PERCENTILES}", field="p")
    for p in percentiles:
        try:
            ok = 0 <= float(p) <= 100
        except ValueError:
            continue  # FastAPI names a value that is not a number
        if not ok:
            raise BadRenderParameter(f"percentiles are between 0 and 100, not {p}", field="p")
    if len(q.getlist("c")) > MAX_CATEGORIES:
        raise LimitExceeded(
            f"{len(q.getlist('c'))} categories asked for; at most {MAX_CATEGORIES}", field="c"
        )


def _check_positions(request: Request) -> None:
    """Tile indexes and lon/lat positions in the path: in range, or a 4xx that names them."""
    path = request.path_params
    z = _int(request, "z", path)
    if z is not None:
        if not 0 <= z <= MAX_ZOOM:
            raise TileNotAvailable(f"zoom {z} is outside 0..{MAX_ZOOM}", field="z")
        for name in ("x", "y"):
            v = _int(request, name, path)
            if v is not None and not 0 <= v < 2**z:
                raise TileNotAvailable(f"{name} {v} does not exist at zoom {z} (0..{2**z - 1})", field=name)
    geographic = "coord_crs" not in request.query_params
    lon, lat = _float(request, "lon", path), _float(request, "lat", path)
    if geographic and lon is not None and not -180 <= lon <= 180:
        raise BadRenderParameter(f"lon must be between -180 and 180, not {lon:g}", field="lon")
    if geographic and lat is not None and not -90 <= lat <= 90:
        raise BadRenderParameter(f"lat must be between -90 and 90, not {lat:g}", field="lat")
    minx, miny, maxx, maxy = (_float(request, k, path) for k in ("minx", "miny", "maxx", "maxy"))
    if minx is not None and miny is not None and maxx is not None and maxy is not None:
        if not minx < maxx:
            raise BadRenderParameter(f"minx ({minx:g}) must be less than maxx ({maxx:g})", field="minx")
        if not miny < maxy:
            raise BadRenderParameter(f"miny ({miny:g}) must be less than maxy ({maxy:g})", field="miny")
        if geographic and not (minx >= -180 and maxx <= 180 and miny >= -90 and maxy <= 90):
            raise BadRenderParameter(
                "the bbox must be within -180..180, -90..90 (or give coord_crs)", field="minx"
            )


class LimitedReader(Reader):
    """rio-tiler's Reader with every read held to `limits` (set on a subclass per app): the
    bands it reads and the pixels it reads them at, however the request's parameters combined.
    An image without a size is read at most `max_preview_px` on its longest side instead of at
    full resolution."""

    limits: ClassVar[Limits]
    #: what a size-less read is capped at: previews, or statistics while `statistics` runs
    _size_cap: int | None = None

    def statistics(self, *args, max_size: int = DEFAULT_SIZE, **kwargs):
        self._size_cap = self.limits.max_statistics_px
        try:  # TiTiler's default size, where it is over the cap, comes down to it
            kwargs["max_size"] = min(max_size, self.limits.max_statistics_px)
            return super().statistics(*args, **kwargs)
        finally:
            self._size_cap = None

    def _open_dataset(self) -> Any:
        """`dataset`, which rio-tiler types as optional (it is open for a reader's whole life)."""
        if self.dataset is None:
            raise RuntimeError(f"{self.input}: the reader has no open dataset")
        return self.dataset

    def _bands(self, indexes: Any, expression: str | None) -> tuple[int, str]:
        """How many bands the read holds, and the parameter that chose them (band numbers
        outside the dataset are a 422 here, not an IndexError in rasterio)."""
        count = self._open_dataset().count
        if expression:
            read = parse_expression(expression)
            if not all(1 <= b <= count for b in read):
                raise BadRenderParameter(
                    f"expression names bands outside 1..{count} (b1..b{count})", field="expression"
                )
            return max(len(read), len(get_expression_blocks(expression))), "expression"
        if indexes:
            idx = list(indexes) if isinstance(indexes, (list, tuple)) else [indexes]
            if not all(1 <= b <= count for b in idx):
                raise BadRenderParameter(f"bidx must be band numbers between 1 and {count}", field="bidx")
            return len(idx), "bidx"
        return count, "bidx"

    def point(self, lon, lat, coord_crs=WGS84_CRS, indexes=None, expression=None, **kwargs):
        self._bands(indexes, expression)
        return super().point(lon, lat, coord_crs=coord_crs, indexes=indexes, expression=expression, **kwargs)

    def tile(
        self, tile_x, tile_y, tile_z, tilesize=None, indexes=None, expression=None, buffer=None, **kwargs
    ):
        side = (tilesize or 256) + 2 * math.ceil(buffer or 0) + 2 * int(kwargs.get("padding") or 0)
        bands, band_field = self._bands(indexes, expression)
        self.limits.check_read(bands, side, side, "tilesize" if tilesize else band_field)
        return super().tile(
            tile_x,
            tile_y,
            tile_z,
            tilesize=tilesize,
            indexes=indexes,
            expression=expression,
            buffer=buffer,
            **kwargs,
        )

    def part(
        self,
        bbox,
        dst_crs=None,
        bounds_crs=WGS84_CRS,
        indexes=None,
        expression=None,
        max_size=None,
        height=None,
        width=None,
        buffer=None,
        **kwargs,
    ):
        if not (max_size or height or width):
            max_size = self.limits.max_preview_px
        if height and width:
            h, w, field = height, width, "width"
        elif max_size:
            h = w = max_size
            field = "max_size"
        else:  # one side given: the other follows the box's aspect, in the CRS it is read in
            aspect = _aspect(bbox, bounds_crs, dst_crs or bounds_crs)
            h, w = (height, math.ceil(height / aspect)) if height else (math.ceil(width * aspect), width)
            field = "height" if height else "width"
            self.limits.check_preview(max(h, w), field)
        grow = 2 * math.ceil(buffer or 0) + 2 * int(kwargs.get("padding") or 0)
        bands, band_field = self._bands(indexes, expression)
        self.limits.check_read(
            bands, h + grow, w + grow, band_field if bands > self.limits.max_bands else field
        )
        return super().part(
            bbox,
            dst_crs=dst_crs,
            bounds_crs=bounds_crs,
            indexes=indexes,
            expression=expression,
            max_size=max_size,
            height=height,
            width=width,
            buffer=buffer,
            **kwargs,
        )

    def read(self, indexes=None, expression=None, **kwargs):
        cap = self._size_cap or self.limits.max_preview_px
        if (
            kwargs.get("max_size") and kwargs["max_size"] > cap
        ):  # TiTiler's default (an explicit one is refused before)
            kwargs["max_size"] = cap
        height, width, max_size = kwargs.get("height"), kwargs.get("width"), kwargs.get("max_size")
        ds = self._open_dataset()
        dh, dw = ds.height, ds.width
        if height and width:
            h, w, field = height, width, "width"
        elif height or width:
            h, w = (height, math.ceil(height * dw / dh)) if height else (math.ceil(width * dh / dw), width)
            field = "height" if height else "width"
            self.limits.check_preview(max(h, w), field)
        elif max_size:
            (h, w), field = fit(max_size, dh, dw), "max_size"
        else:
            h, w, field = dh, dw, "max_size"
        bands, band_field = self._bands(indexes, expression)
        self.limits.check_read(bands, h, w, band_field if bands > self.limits.max_bands else field)
        return super().read(indexes=indexes, expression=expression, **kwargs)


def _aspect(bbox, bounds_crs, crs) -> float:
    """Height over width of `bbox` in `crs`."""
    try:
        w, s, e, n = transform_bounds(bounds_crs, crs, *bbox, densify_pts=21) if bounds_crs != crs else bbox
    except Exception:  # noqa: BLE001 - a box the transform cannot take (PROJ's errors vary): judged square
        return 1.0
    return (n - s) / (e - w) if e > w and n > s else 1.0


def limited_reader(limits: Limits) -> type[LimitedReader]:
    return type("Reader", (LimitedReader,), {"limits": limits})
