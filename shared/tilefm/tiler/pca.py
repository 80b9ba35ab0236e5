"""Per-job render statistics: a PCA projection of the embedding to three colours and per-band
display ranges, computed once from a sample of the COG and stored beside it.

Computing them per tile would make neighbouring tiles disagree in colour (each tile its own
projection); one projection per job keeps the map seamless and the tiles cheap.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import rasterio

from tilefm.errors import StorageError

log = logging.getLogger(__name__)

#: pixels sampled from the output's smallest overview that still has this many columns
SAMPLE_SIZE = 512
MAX_PIXELS = 50_000
PERCENTILES = (2.0, 98.0)


@dataclass
class RenderStats:
    mean: list[float]
    components: list[list[float]]  # [3][bands]
    explained_variance_ratio: list[float]
    pca_lo: list[float]
    pca_hi: list[float]
    band_lo: list[float]
    band_hi: list[float]
    pixels: int

    def project(self, values: np.ndarray) -> np.ndarray:
        """[bands, H, W] -> [3, H, W] principal components (NaN stays NaN)."""
        flat = values.reshape(values.shape[0], -1)
        comps = np.asarray(self.components, np.float32)
        # C (x - m) as C x - C m: no centred copy of all the bands
        out = comps @ flat - (comps @ np.asarray(self.mean, np.float32))[:, None]
        return out.reshape(3, *values.shape[1:])

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RenderStats:
        return cls(**json.loads(data))


def compute(values: np.ndarray, rng_seed: int = 0) -> RenderStats:
    """From [bands, H, W] de-quantized values (NaN = no data)."""
    flat = values.reshape(values.shape[0], -1).T
    flat = flat[np.isfinite(flat).all(axis=1)].astype(np.float64)
    if len(flat) == 0:
        raise ValueError("the output has no valid pixels")
    if len(flat) > MAX_PIXELS:
        flat = flat[np.random.default_rng(rng_seed).choice(len(flat), MAX_PIXELS, replace=False)]
    mean = flat.mean(axis=0)
    centred = flat - mean
    # the principal axes as eigenvectors of the bands' scatter matrix (bands x bands), largest
    # first: the same axes as an SVD of the pixels at a small fraction of its cost (an SVD of 50k
    # pixels x 128 bands takes seconds of CPU, which a busy tiler spends before its first tile)
    var, vecs = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(var)[::-1]
    var = np.clip(var[order], 0.0, None)
    vt = vecs[:, order].T
    comps = np.zeros((3, flat.shape[1]))
    k = min(3, vt.shape[0], len(flat))
    comps[:k] = vt[:k]
    # a component's sign is arbitrary: fix it (largest loading positive) so reruns agree
    for i in range(k):
        if comps[i, np.argmax(np.abs(comps[i]))] < 0:
            comps[i] = -comps[i]
    proj = centred @ comps.T
    ratio = (var[:3] / var.sum()).tolist() if var.sum() > 0 else [0.0] * 3
    # both percentiles in one pass per band, over contiguous rows (a column-wise partition of
    # pixels x bands cost more than everything else here)
    pca_lo, pca_hi = np.percentile(np.ascontiguousarray(proj.T), PERCENTILES, axis=1)
    band_lo, band_hi = np.percentile(np.ascontiguousarray(flat.T), PERCENTILES, axis=1)
    return RenderStats(
        mean=mean.tolist(),
        components=comps.tolist(),
        explained_variance_ratio=ratio + [0.0] * (3 - len(ratio)),
        pca_lo=pca_lo.tolist(),
        pca_hi=pca_hi.tolist(),
        band_lo=band_lo.tolist(),
        band_hi=band_hi.tolist(),
        pixels=len(flat),
    )


def sample(path: str, dequantize, max_bytes: int | None = None) -> np.ndarray:
    """The output at the overview closest to SAMPLE_SIZE columns: the whole scene, evenly; read
    smaller where its bands at that size would be over `max_bytes` of float32."""
    with rasterio.open(path) as src:
        levels = [1, *src.overviews(1)]
        factor = max((f for f in levels if src.width / f >= SAMPLE_SIZE), default=1)
        h, w = max(1, src.height // factor), max(1, src.width // factor)
        if max_bytes is not None and src.count * h * w * 4 > max_bytes:
            shrink = (max_bytes / (src.count * h * w * 4)) ** 0.5
            h, w = max(1, int(h * shrink)), max(1, int(w * shrink))
        data = src.read(out_shape=(src.count, h, w), resampling=rasterio.enums.Resampling.nearest)
    return dequantize(data)


def load_or_compute(
    output, storage, env: dict, max_bytes: int | None = None, *, store: bool = True
) -> RenderStats:
    """Stats stored beside the COG (`<name>.pca.json`), or computed now and stored there (unless
    `store` is false). A read-only store (the tiler may hold read-only credentials) keeps them in
    memory only."""
    uri = stats_uri(output.uri)
    try:
        return RenderStats.from_json(storage.read_bytes(uri))
    except (StorageError, FileNotFoundError, KeyError, json.JSONDecodeError, TypeError):
        pass
    with rasterio.Env(**env):
        stats = compute(sample(output.path, output.dequantize, max_bytes))
    if not store:
        return stats
    try:
        storage.write_bytes(uri, stats.to_json())
    except StorageError as e:
        log.warning("render stats for job %s kept in memory only: %s", output.job_id, e)
    return stats


def stats_uri(cog_uri: str) -> str:
    return cog_uri[: -len(".tif")] + ".pca.json" if cog_uri.endswith(".tif") else cog_uri + ".pca.json"
