"""Renderings of output values: class colours, band composites, PCA, similarity.

Each takes de-quantized values ([bands, H, W] float32, NaN where there is no data) and returns
either display bytes' source (uint8 RGB + alpha) or, for the raw formats, float values.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from rio_tiler.colormap import cmap as colormaps

from tilefm.tiler.errors import BadRenderParameter
from tilefm.tiler.pca import RenderStats

IMAGE_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
RAW_FORMATS = {"npy": "NPY", "tif": "GTIFF"}
MEDIA_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpg": "image/jpeg",
    "npy": "application/x-binary",
    "tif": "image/tiff; application=geotiff",
}
RENDERS = ("classes", "pca", "rgb", "similarity", "raw")


@dataclass(frozen=True)
class RenderParams:
    """How to draw a tile, from the query string."""

    render: str
    bands: tuple[int, ...] = ()  # 1-based, for rgb
    rescale: tuple[float, float] | None = None
    colormap_name: str = "viridis"
    query: np.ndarray | None = None  # similarity query vector
    #: similarity drawn by rank: the map's similarity percentiles 0..100 (when no rescale is given)
    quantiles: tuple[float, ...] | None = None

    def key(self) -> str:
        q = "" if self.query is None else np.asarray(self.query, np.float32).tobytes().hex()
        return f"{self.render}|{self.bands}|{self.rescale}|{self.colormap_name}|{q}"


def to_uint8(
    values: np.ndarray, lo: np.ndarray | np.floating | float, hi: np.ndarray | np.floating | float
) -> np.ndarray:
    lo = np.asarray(lo, np.float32).reshape(-1, 1, 1) if np.ndim(lo) else np.float32(lo)
    hi = np.asarray(hi, np.float32).reshape(-1, 1, 1) if np.ndim(hi) else np.float32(hi)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = np.clip((values - lo) / span, 0.0, 1.0) * 255.0
    return np.nan_to_num(scaled, nan=0.0).round().astype(np.uint8)


def rgb_bands(
    values: np.ndarray, stats: RenderStats | None, bands: tuple[int, ...], rescale: tuple[float, float] | None
) -> np.ndarray:
    """values holds exactly the requested bands (read with those indexes); `stats` is only
    needed without `rescale`."""
    if rescale:
        return to_uint8(values, *rescale)
    if stats is None:
        raise ValueError("rgb_bands needs the output's statistics or a rescale")
    idx = [b - 1 for b in bands]
    return to_uint8(values, np.asarray(stats.band_lo)[idx], np.asarray(stats.band_hi)[idx])


def pca(values: np.ndarray, stats: RenderStats) -> np.ndarray:
    return to_uint8(stats.project(values), np.asarray(stats.pca_lo), np.asarray(stats.pca_hi))


#: pixels whose similarity is computed at once: the float64 copies stay a few MiB however
#: large the image (a whole 128-band tile at once was ~8 times the tile's own size)
SIMILARITY_CHUNK = 16384


def cosine_similarity(values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[bands, H, W] x [bands] -> [H, W] in [-1, 1]; NaN where the pixel has no value."""
    q = np.asarray(query, np.float64)
    qn = np.linalg.norm(q)
    if not np.isfinite(qn) or qn == 0:
        raise BadRenderParameter("the query vector is zero or not finite", field="vector")
    flat = values.reshape(values.shape[0], -1)
    out = np.empty(flat.shape[1], np.float32)
    for i in range(0, flat.shape[1], SIMILARITY_CHUNK):
        part = flat[:, i : i + SIMILARITY_CHUNK].astype(np.float64)
        missing = np.isnan(part).any(axis=0)
        np.nan_to_num(part, copy=False)
        dots = q @ part
        norms = np.linalg.norm(part, axis=0) * qn
        sim = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.nan)
        sim[missing] = np.nan
        out[i : i + SIMILARITY_CHUNK] = np.clip(sim, -1.0, 1.0)
    return out.reshape(values.shape[1:])


def rank(values: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Values -> 0..1 by their place among `quantiles` (NaN stays NaN)."""
    q = np.asarray(quantiles, np.float64)
    q = np.maximum.accumulate(q)  # np.interp needs them non-decreasing (they are, up to rounding)
    out = np.interp(values, q, np.linspace(0.0, 1.0, len(q))).astype(np.float32)
    out[np.isnan(values)] = np.nan
    return out


def check_colormap(name: str) -> None:
    """A colormap name rio-tiler knows, checked when a layer is asked for (TileJSON, WMTS), not
    first at its tiles."""
    if name not in colormaps.list():
        raise BadRenderParameter(f"unknown colormap {name!r}", field="colormap_name")


def colormap_rgb(values: np.ndarray, name: str, rescale: tuple[float, float]) -> np.ndarray:
    """[H, W] floats -> [3, H, W] uint8 through a named rio-tiler colormap."""
    try:
        lut = np.array([colormaps.get(name)[i][:3] for i in range(256)], np.uint8)
    except Exception as e:  # rio-tiler's InvalidColorMapName
        raise BadRenderParameter(f"unknown colormap {name!r}", field="colormap_name") from e
    idx = to_uint8(values[None], *rescale)[0]
    return np.moveaxis(lut[idx], -1, 0)


def parse_bands(text: str | None, count: int) -> tuple[int, ...]:
    if not text:
        return (1, 2, 3) if count >= 3 else (1,) * 3
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise BadRenderParameter(
            f"bands must be 1 or 3 comma-separated band numbers, not {text!r}", field="bands"
        ) from None
    if len(bands) not in (1, 3) or not all(1 <= b <= count for b in bands):
        raise BadRenderParameter(
            f"bands must be 1 or 3 band numbers between 1 and {count}, not {text!r}", field="bands"
        )
    return bands * 3 if len(bands) == 1 else bands


def parse_rescale(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise BadRenderParameter(f"rescale must be 'min,max', not {text!r}", field="rescale") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise BadRenderParameter(f"rescale needs finite min < max, not {text!r}", field="rescale")
    return lo, hi


def parse_vector(text: str, count: int) -> np.ndarray:
    try:
        v = np.array([float(x) for x in text.split(",")], np.float32)
    except ValueError:
        raise BadRenderParameter("vector must be comma-separated numbers", field="vector") from None
    if v.size != count:
        raise BadRenderParameter(f"vector has {v.size} values; the output has {count} bands", field="vector")
    return v


#: zlib level 1: PNG tiles ~10 % larger than level 6, encoded 3-4x faster (tiles are served far
#: more often than they are fetched over slow links; HTTP caches keep them)
PNG_LEVEL = 1
QUALITY = 85


def encode_rgba(rgb: np.ndarray, valid: np.ndarray, fmt: str) -> bytes:
    """uint8 [3, H, W] + validity [H, W] -> PNG/WEBP with alpha, or JPEG (no data black)."""
    hwc = np.moveaxis(rgb, 0, -1)
    if fmt == "jpg":
        img = Image.fromarray(np.where(valid[..., None], hwc, 0).astype(np.uint8), "RGB")
    else:
        img = Image.fromarray(np.dstack([hwc, np.where(valid, 255, 0).astype(np.uint8)]), "RGBA")
    return _save(img, fmt)


def encode_classes(
    classes: np.ndarray, colormap: dict[int, tuple[int, int, int, int]], nodata: int, fmt: str
) -> bytes:
    """uint8 class numbers [H, W] -> a paletted PNG (the class numbers are the palette indexes,
    no data transparent), or WEBP/JPEG in the palette's colours."""
    palette = np.zeros((256, 3), np.uint8)
    alpha = np.full(256, 255, np.uint8)
    for value, colour in colormap.items():
        palette[value] = colour[:3]
        alpha[value] = colour[3]
    alpha[nodata] = 0
    img = Image.fromarray(np.ascontiguousarray(classes, np.uint8), "P")
    img.putpalette(palette.tobytes())
    if fmt == "png":
        img.info["transparency"] = alpha.tobytes()
        return _save(img, fmt)
    if fmt == "jpg":
        return _save(img.convert("RGB"), fmt)
    rgba = np.dstack([palette[classes], alpha[classes]])
    return _save(Image.fromarray(rgba, "RGBA"), fmt)


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(
            buf,
            "PNG",
            compress_level=PNG_LEVEL,
            **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}),
        )
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=QUALITY, method=0)
    else:
        img.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()
