"""Tiles, points, statistics and previews of job outputs and of their input scenes.

`OutputTiles` reads a job's COG with rio-tiler and renders it (`render.py`); `SceneTiles` warps
the job's input scene onto the same tiles as true colour, so outputs can be compared against
what the model saw.

Why one module (~530 lines): `OutputTiles` and `SceneTiles` answer the same requests (tiles,
points, previews, statistics) for the two things a map compares, on the same tile arithmetic and
thread-local GDAL environment.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import morecantile
import numpy as np
import rasterio
from rio_tiler.errors import PointOutsideBounds, TileOutsideBounds
from rio_tiler.models import ImageData

from tilefm.grid import TMS
from tilefm.io.read import ReaderCache
from tilefm.io.scene import Scene, open_scene
from tilefm.settings import Settings
from tilefm.storage import gdal_env, storage_for
from tilefm.tiler import pca, render
from tilefm.tiler.errors import BadRenderParameter, TileNotAvailable
from tilefm.tiler.limits import Limits
from tilefm.tiler.outputs import JobOutput
from tilefm.tiler.render import RenderParams

TILE_SIZE = 256
SUPPORTED_TMS = ("WebMercatorQuad",)
#: true colour: Sentinel-2 L2A reflectance x 10000 shown over 0..3000 (bright surfaces and clouds saturate)
TRUE_COLOUR = ("B04", "B03", "B02")
TRUE_COLOUR_RESCALE = (0.0, 3000.0)


class _ThreadEnv(threading.local):
    key: str | None = None
    env: rasterio.Env | None = None


_thread_env = _ThreadEnv()


def thread_env(options: dict) -> contextlib.AbstractContextManager:
    """The GDAL options (S3 endpoint, credentials) active in this thread, entered once per thread
    and kept: entering a rasterio.Env per tile cost ~6 % of a tile's CPU (it probes GDAL's and
    PROJ's data files every time). Threads serving other settings switch it."""
    key = repr(sorted((k, repr(v) if k != "session" else id(v)) for k, v in options.items()))
    if _thread_env.key != key:
        if _thread_env.env is not None:
            _thread_env.env.__exit__(None, None, None)
        _thread_env.env = rasterio.Env(**options)
        _thread_env.env.__enter__()
        _thread_env.key = key
    return contextlib.nullcontext()


def check_tile(tms: str, z: int, x: int, y: int, minzoom: int, maxzoom: int, scale: int) -> None:
    if tms not in SUPPORTED_TMS:
        raise TileNotAvailable(
            f"unknown tile matrix set {tms!r}; available: {', '.join(SUPPORTED_TMS)}", field="tms"
        )
    if not minzoom <= z <= maxzoom:
        raise TileNotAvailable(f"zoom {z} is outside this layer's range {minzoom}..{maxzoom}")
    if not (0 <= x < 2**z and 0 <= y < 2**z):
        raise TileNotAvailable(
            f"tile {z}/{x}/{y} does not exist (x and y run 0..{2**z - 1} at zoom {z})", field="x"
        )
    if scale not in (1, 2, 3, 4):
        raise BadRenderParameter(f"scale must be 1, 2, 3 or 4, not {scale}", field="scale")


def encode_image(rgb: np.ndarray, mask: np.ndarray, fmt: str, img: ImageData) -> bytes:
    """uint8 [3, H, W] + validity [H, W] -> PNG/WEBP (with alpha) or JPEG (no-data black)."""
    return render.encode_rgba(rgb, mask, fmt)


def encode_raw(values: np.ndarray, fmt: str, img: ImageData, nodata: float | None) -> bytes:
    """Raw values: .npy (numpy's format, NaN = no data) or a georeferenced GeoTIFF."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, values)
        return buf.getvalue()
    mask = np.isnan(values) if values.dtype.kind == "f" else (values == nodata)
    data = np.ma.MaskedArray(values, mask=mask)
    return ImageData(data, bounds=img.bounds, crs=img.crs).render(img_format="GTIFF", add_mask=False)


def read_aligned(
    src, out: JobOutput, z: int, x: int, y: int, size: int, indexes: list[int] | None
) -> ImageData:
    """A tile of an output COG, read as a window: tilefm writes outputs on the tile grid (origin on
    a tile corner, pixel = the native zoom's, 256-px blocks and overviews per zoom level), so a
    tile is whole blocks of one overview, or part of a block upsampled (nearest) past the native
    zoom. No warping: ~10x cheaper than a generic reprojected read, and the same pixels."""
    idx = indexes or list(range(1, src.count + 1))
    b = TMS.xy_bounds(morecantile.Tile(x, y, z))
    res = src.transform.a
    col0 = (b.left - src.transform.c) / res
    row0 = (src.transform.f - b.top) / res
    span = (b.right - b.left) / res  # tile width in native pixels
    if not (
        abs(col0 - round(col0)) < 1e-6 and abs(row0 - round(row0)) < 1e-6 and abs(span - round(span)) < 1e-6
    ):
        raise TileNotAvailable(f"tile {z}/{x}/{y} is not on this output's grid")  # not a tilefm COG
    col0, row0, span = round(col0), round(row0), round(span)
    # the part of the tile inside the raster, in native pixels
    c0, r0 = max(col0, 0), max(row0, 0)
    c1, r1 = min(col0 + span, src.width), min(row0 + span, src.height)
    if c1 <= c0 or r1 <= r0:
        raise TileNotAvailable(f"tile {z}/{x}/{y} is outside the output's bounds")
    dtype = src.dtypes[0]
    nodata = src.nodata
    fill = nodata if nodata is not None else 0
    px = size / span  # output pixels per native pixel
    oc0, or0 = round((c0 - col0) * px), round((r0 - row0) * px)
    oc1, or1 = round((c1 - col0) * px), round((r1 - row0) * px)
    win = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
    whole = (or0, oc0, or1, oc1) == (0, 0, size, size)
    data = (
        np.empty((len(idx), size, size), dtype)
        if whole and px <= 1
        else np.full((len(idx), size, size), fill, dtype)
    )
    if whole and px <= 1:  # the usual tile: read straight into it (no second copy of every band)
        src.read(idx, window=win, out=data, resampling=rasterio.enums.Resampling.nearest)
    elif px >= 1:  # at or past the native zoom: read native pixels, repeat them
        part = src.read(idx, window=win)
        k = round(px)
        data[:, or0:or1, oc0:oc1] = np.repeat(np.repeat(part, k, axis=1), k, axis=2) if k > 1 else part
    else:  # zoomed out: GDAL reads the matching overview
        data[:, or0:or1, oc0:oc1] = src.read(
            idx,
            window=win,
            out_shape=(len(idx), or1 - or0, oc1 - oc0),
            resampling=rasterio.enums.Resampling.nearest,
        )
    if nodata is None:
        mask = np.zeros(data.shape, bool)
    elif np.isnan(nodata):
        mask = np.isnan(data)
    else:
        mask = data == nodata
    mask[:, :or0, :] = mask[:, or1:, :] = True
    mask[:, :, :oc0] = mask[:, :, oc1:] = True
    return ImageData(np.ma.MaskedArray(data, mask=mask), bounds=tuple(b), crs=TMS.rasterio_crs)


@dataclass
class OutputTiles:
    """Reads and renders one deployment's job outputs."""

    settings: Settings
    #: keep the PCA statistics beside each COG (`<name>.pca.json`) for the next process
    store_stats: bool = True

    def __post_init__(self) -> None:
        self._readers = ReaderCache()
        self._env = gdal_env(self.settings)
        self.limits = Limits.from_settings(self.settings)
        self._stats: dict[str, pca.RenderStats] = {}
        self._stats_lock = threading.Lock()
        self._samples: dict[str, np.ndarray] = {}
        self._queries: OrderedDict[tuple, tuple[np.ndarray, tuple[float, ...]]] = OrderedDict()

    def env(self) -> contextlib.AbstractContextManager:
        return thread_env(self._env)

    def stats(self, out: JobOutput) -> pca.RenderStats:
        with self._stats_lock:  # one computation per job, however many tiles ask at once
            s = self._stats.get(out.job_id)
            if s is None:
                s = self._stats[out.job_id] = pca.load_or_compute(
                    out,
                    storage_for(out.uri, self.settings),
                    self._env,
                    max_bytes=self.limits.max_read_bytes,
                    store=self.store_stats,
                )
            return s

    def sample(self, out: JobOutput) -> np.ndarray:
        """A few thousand valid pixels of the whole output, [bands, N] (for similarity ranges)."""
        with self._stats_lock:
            smp = self._samples.get(out.job_id)
        if smp is None:
            with self.env():
                img = self._readers.get(out.path).preview(max_size=128, resampling_method="nearest")
            values = out.dequantize(np.ma.getdata(img.array)).reshape(out.count, -1)
            values[:, np.ma.getmaskarray(img.array).reshape(out.count, -1).any(axis=0)] = np.nan
            smp = values[:, np.isfinite(values).all(axis=0)]
            with self._stats_lock:
                self._samples[out.job_id] = smp
        return smp

    def similarity_quantiles(self, out: JobOutput, query: np.ndarray) -> tuple[float, ...]:
        """Percentiles 0..100 of the whole output's similarity to the query. Similarity maps are
        drawn by rank (a pixel's colour says how many pixels of the map are less similar): embeddings
        share a large common direction (half of Presto's pixels are > 0.998 similar to any given
        one), so any linear range paints most of the map alike."""
        smp = self.sample(out)
        if smp.shape[1] == 0:
            return tuple(np.linspace(-1.0, 1.0, 101))
        sims = render.cosine_similarity(smp[:, :, None], query)[:, 0]
        return tuple(float(v) for v in np.percentile(sims[np.isfinite(sims)], np.arange(101)))

    def params(
        self,
        out: JobOutput,
        render_name: str | None,
        bands: str | None,
        rescale: str | None,
        colormap_name: str | None,
        lon: float | None,
        lat: float | None,
        vector: str | None,
    ) -> RenderParams:
        name = render_name or out.default_render
        allowed = out.renders + ["raw"]
        if name not in allowed:
            raise BadRenderParameter(
                f"render {name!r} is not available for a {out.kind} output; choose one of "
                f"{', '.join(allowed)}",
                field="render",
            )
        query, quantiles = None, None
        resc = render.parse_rescale(rescale)
        if colormap_name is not None:
            render.check_colormap(colormap_name)
        if name == "similarity":
            if not vector and (lon is None or lat is None):
                raise BadRenderParameter(
                    "similarity needs a query: lon and lat of a pixel, or vector", field="lon"
                )
            query, quantiles = self._similarity_query(out, lon, lat, vector)
        return RenderParams(
            render=name,
            bands=render.parse_bands(bands, out.count) if name == "rgb" else (),
            rescale=resc,
            colormap_name=colormap_name or "viridis",
            query=query,
            quantiles=quantiles if resc is None else None,
        )

    def _similarity_query(
        self, out: JobOutput, lon: float | None, lat: float | None, vector: str | None
    ) -> tuple[np.ndarray, tuple[float, ...]]:
        """The query vector and the map's similarity percentiles, once per (job, query): every
        tile of a similarity layer asks the same question, and the answer costs a point read and
        a pass over the job's sample."""
        key = (out.job_id, out.version, vector or (lon, lat))
        with self._stats_lock:
            hit = self._queries.get(key)
            if hit is not None:
                self._queries.move_to_end(key)
                return hit
        if vector:
            query = render.parse_vector(vector, out.count)
        elif lon is not None and lat is not None:
            query = self.vector_at(out, lon, lat)
        else:
            raise BadRenderParameter(
                "similarity needs a query: lon and lat of a pixel, or vector", field="lon"
            )
        hit = (query, self.similarity_quantiles(out, query))
        with self._stats_lock:
            self._queries[key] = hit
            while len(self._queries) > 256:
                self._queries.popitem(last=False)
        return hit

    def _band_count(self, out: JobOutput, p: RenderParams) -> int:
        idx = self._indexes(out, p)
        return len(idx) if idx is not None else out.count

    def _indexes(self, out: JobOutput, p: RenderParams) -> list[int] | None:
        if p.render == "classes":
            return [1]
        if p.render == "rgb":
            return list(p.bands)
        return None  # all bands

    def tile(
        self, out: JobOutput, tms: str, z: int, x: int, y: int, scale: int, fmt: str, p: RenderParams
    ) -> bytes:
        check_tile(tms, z, x, y, out.minzoom, out.maxzoom, scale)
        size = TILE_SIZE * scale
        self.limits.check_read(self._band_count(out, p), size, size, "scale" if scale > 1 else "render")
        stats = (
            self.stats(out) if p.render in ("pca", "rgb") and not (p.render == "rgb" and p.rescale) else None
        )
        with self.env():
            img = read_aligned(
                self._readers.dataset(out.path), out, z, x, y, TILE_SIZE * scale, self._indexes(out, p)
            )
        return self._render(out, img, fmt, p, stats)

    def _shape(self, out: JobOutput) -> tuple[int, int]:
        with self.env():
            ds = self._readers.dataset(out.path)
            return ds.height, ds.width

    def preview_size(self, out: JobOutput, p: RenderParams, max_size: int | None) -> int:
        """The longest side of the preview: `max_size` within the caps, or the default."""
        height, width = self._shape(out)
        return self.limits.image_size(
            max_size, statistics=False, bands=self._band_count(out, p), height=height, width=width
        )

    def preview(self, out: JobOutput, fmt: str, p: RenderParams, max_size: int) -> bytes:
        """`max_size`: from `preview_size`."""
        stats = (
            self.stats(out) if p.render in ("pca", "rgb") and not (p.render == "rgb" and p.rescale) else None
        )
        with self.env():
            img = self._readers.get(out.path).preview(
                indexes=self._indexes(out, p), max_size=max_size, resampling_method="nearest"
            )
        return self._render(out, img, fmt, p, stats)

    def _render(
        self, out: JobOutput, img: ImageData, fmt: str, p: RenderParams, stats: pca.RenderStats | None
    ) -> bytes:
        raw = np.ma.getdata(img.array)
        valid = ~np.asarray(np.ma.getmaskarray(img.array).any(axis=0))
        if p.render == "classes":
            if fmt in render.RAW_FORMATS:
                return encode_raw(raw.astype(np.uint8), fmt, img, out.nodata)
            classes = np.where(np.ma.getmaskarray(img.array)[0], 255, raw[0]).astype(np.uint8)
            return render.encode_classes(classes, out.colormap(), 255, fmt)
        values = out.dequantize(raw)
        values[:, ~valid] = np.nan
        if p.render == "similarity":
            if p.query is None:
                raise BadRenderParameter(
                    "similarity needs a query: lon and lat of a pixel, or vector", field="lon"
                )
            sim = render.cosine_similarity(values, p.query)
            if fmt in render.RAW_FORMATS:
                return encode_raw(sim[None], fmt, img, None)
            shown = render.rank(sim, p.quantiles) if p.quantiles else sim
            rgb = render.colormap_rgb(shown, p.colormap_name, p.rescale or (0.0, 1.0))
            return encode_image(rgb, np.isfinite(sim), fmt, img)
        if fmt in render.RAW_FORMATS:
            return encode_raw(values, fmt, img, None)
        if p.render == "rgb":
            rgb = render.rgb_bands(values, stats, p.bands, p.rescale)
        elif p.render == "pca":
            if stats is None:
                raise RuntimeError("a PCA rendering needs the output's statistics")
            rgb = (
                render.pca(values, stats)
                if not p.rescale
                else render.to_uint8(stats.project(values), *p.rescale)
            )
        else:  # raw drawn as an image: the first band in grey
            rgb = np.repeat(
                render.to_uint8(values[:1], *(p.rescale or (np.nanmin(values[0]), np.nanmax(values[0])))),
                3,
                axis=0,
            )
        return encode_image(rgb, valid, fmt, img)

    def values_at(self, out: JobOutput, lon: float, lat: float) -> np.ndarray:
        """The de-quantized output values of the pixel at lon/lat (NaN = no data)."""
        if not (-180 <= lon <= 180 and -85.06 <= lat <= 85.06):
            raise BadRenderParameter(
                f"lon/lat ({lon}, {lat}) is not a valid web-mercator position", field="lon"
            )
        with self.env():
            try:
                pt = self._readers.get(out.path).point(lon, lat)
            except PointOutsideBounds:
                raise TileNotAvailable(
                    f"({lon}, {lat}) is outside the output's bounds", field="lon"
                ) from None
        values = (
            out.dequantize(np.ma.getdata(pt.array).reshape(-1))
            if not out.is_classes
            else np.ma.getdata(pt.array).astype(np.float32)
        )
        values[np.ma.getmaskarray(pt.array).reshape(-1)] = np.nan
        return values

    def vector_at(self, out: JobOutput, lon: float, lat: float) -> np.ndarray:
        v = self.values_at(out, lon, lat)
        if not np.isfinite(v).all():
            raise BadRenderParameter(
                f"the output has no value at ({lon}, {lat}) to compare with", field="lon"
            )
        return v

    def point(self, out: JobOutput, lon: float, lat: float) -> dict[str, Any]:
        v = self.values_at(out, lon, lat)
        values = [None if not np.isfinite(x) else float(x) for x in v]
        body: dict[str, Any] = {"coordinates": [lon, lat], "values": values, "band_names": out.band_names}
        if out.is_classes:
            c = next((c for c in out.classes if values[0] is not None and c.value == int(values[0])), None)
            body["class"] = {"value": c.value, "name": c.name, "color": c.color} if c else None
        return body

    def statistics(self, out: JobOutput, bands: list[int] | None, max_size: int | None) -> dict[str, Any]:
        """`max_size` None: the default size, or the largest whose read of these bands fits the
        per-request budget."""
        if bands is not None:
            self.limits.check_bands(len(bands), "bands")
        indexes = bands or list(range(1, out.count + 1))
        if not all(1 <= b <= out.count for b in indexes):
            raise BadRenderParameter(f"bands must be between 1 and {out.count}", field="bands")
        height, width = self._shape(out)
        max_size = self.limits.image_size(
            max_size, statistics=True, bands=len(indexes), height=height, width=width
        )
        with self.env():
            img = self._readers.get(out.path).preview(
                indexes=indexes, max_size=max_size, resampling_method="nearest"
            )
        raw = np.ma.getdata(img.array)
        valid = ~np.ma.getmaskarray(img.array)
        result: dict[str, Any] = {}
        for i, b in enumerate(indexes):
            name = out.band_names[b - 1]
            if out.is_classes:
                vals = raw[i][valid[i]].astype(int)
                hist = {c.name: int((vals == c.value).sum()) for c in out.classes}
                total = max(1, int(valid[i].sum()))
                result[name] = {
                    "count": int(valid[i].sum()),
                    "classes": hist,
                    "fractions": {k: round(v / total, 6) for k, v in hist.items()},
                }
                continue
            v = out.dequantize(raw[i])[valid[i]]
            v = v[np.isfinite(v)]
            if v.size == 0:
                result[name] = {"count": 0}
                continue
            p2, p98 = np.percentile(v, [2, 98])
            result[name] = {
                "count": int(v.size),
                "min": float(v.min()),
                "max": float(v.max()),
                "mean": float(v.mean()),
                "std": float(v.std()),
                "percentile_2": float(p2),
                "percentile_98": float(p98),
            }
        return result


@dataclass
class SceneTiles:
    """True-colour tiles of a job's input scene (the Sentinel-2 bands B04, B03, B02)."""

    settings: Settings

    def __post_init__(self) -> None:
        self._scenes: dict[str, Scene] = {}
        self._lock = threading.Lock()
        self._readers = ReaderCache()
        self._env = gdal_env(self.settings)

    def scene(self, out: JobOutput, sources: dict[str, str]) -> Scene:
        with self._lock:
            s = self._scenes.get(out.job_id)
        if s is None:
            with rasterio.Env(**self._env):
                s = open_scene(sources)
            with self._lock:
                self._scenes[out.job_id] = s
        return s

    def bands(self, scene: Scene) -> list:
        s2 = scene.modalities.get("s2")
        if s2 is None or not all(b in s2.bands for b in TRUE_COLOUR):
            raise TileNotAvailable("the scene has no true-colour bands (s2 B04, B03, B02)", field="scene")
        return [s2.bands[b] for b in TRUE_COLOUR]

    def tile(
        self,
        out: JobOutput,
        scene: Scene,
        tms: str,
        z: int,
        x: int,
        y: int,
        scale: int,
        fmt: str,
        rescale: tuple[float, float] | None,
    ) -> bytes:
        check_tile(tms, z, x, y, out.minzoom, out.maxzoom, scale)
        if fmt in render.RAW_FORMATS:
            raise BadRenderParameter("the scene is served as png, webp or jpg", field="format")
        n = TILE_SIZE * scale
        bands = self.bands(scene)
        values = np.zeros((3, n, n), np.float32)
        valid = np.ones((n, n), bool)
        img = None
        with self.env():
            for i, band in enumerate(bands):
                try:
                    img = self._readers.get(band.path).tile(
                        x,
                        y,
                        z,
                        tilesize=n,
                        indexes=band.index,
                        resampling_method="bilinear",
                        reproject_method="bilinear",
                    )
                except TileOutsideBounds:
                    raise TileNotAvailable(f"tile {z}/{x}/{y} is outside the scene") from None
                values[i] = np.ma.getdata(img.array)[0] + np.float32(band.offset)
                valid &= ~np.ma.getmaskarray(img.array)[0]
        if img is None:
            raise BadRenderParameter("the scene has no bands to show", field="render")
        rgb = render.to_uint8(values, *(rescale or TRUE_COLOUR_RESCALE))
        return encode_image(rgb, valid, fmt, img)

    def env(self) -> contextlib.AbstractContextManager:
        return thread_env(self._env)


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    b = TMS.bounds(morecantile.Tile(x, y, z))
    return b.left, b.bottom, b.right, b.top
