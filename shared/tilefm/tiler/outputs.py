"""A finished job's output as the tiler sees it: where the COG is and how to read its values.

Everything comes from the COG itself (its TILEFM_* tags hold the model card, zoom and
quantization), so the tiler needs no model registry and serves outputs written by any version
that wrote the same tags.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from rasterio.warp import transform_bounds

from tilefm.card import ModelCard
from tilefm.engine.cog import stored_dtype
from tilefm.jobs.models import Job, JobState
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings
from tilefm.storage import gdal_env, storage_for
from tilefm.tiler.errors import JobNotFinished, OutputUnreadable

#: zoom levels past the native one that tiles are still served at (nearest-neighbour overzoom)
OVERZOOM = 3


@dataclass(frozen=True)
class ClassInfo:
    value: int
    name: str
    color: str  # "#rrggbb"


@dataclass(frozen=True)
class JobOutput:
    """One output COG of a succeeded job, with what is needed to render and de-quantize it."""

    job_id: str
    uri: str  # s3://... or file:///...
    path: str  # what GDAL opens (/vsis3/..., /local/path)
    model: str
    kind: str  # "classes" | "embedding" | ...
    count: int
    band_names: list[str]
    dtype: str
    nodata: float | None
    scale: float
    offset: float
    native_zoom: int
    minzoom: int
    maxzoom: int
    bounds: tuple[float, float, float, float]  # lon/lat
    classes: list[ClassInfo] = field(default_factory=list)
    scene: dict[str, str] = field(default_factory=dict)
    created: str = ""
    #: the job's finish time: part of every ETag, so a re-run under the same id is never served stale
    version: str = ""

    @property
    def is_classes(self) -> bool:
        return self.kind == "classes"

    @property
    def renders(self) -> list[str]:
        return ["classes"] if self.is_classes else ["pca", "rgb", "similarity"]

    @property
    def default_render(self) -> str:
        return "classes" if self.is_classes else "pca"

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """Stored values -> model output values (float32; nodata -> NaN, classes stay integers).
        float32 values are converted in place, without a copy (a 128-band tile is 32 MiB):
        callers pass arrays they have just read and do not use again."""
        v = values.astype(np.float32, copy=False)
        if self.nodata is not None and not np.isnan(self.nodata):
            v[values == self.nodata] = np.nan
        if self.scale != 1.0 or self.offset != 0.0:
            v = v * np.float32(self.scale)
            v += np.float32(self.offset)
        return v

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        cmap = {c.value: (*_hex_rgb(c.color), 255) for c in self.classes}
        return cmap

    def legend(self) -> list[dict[str, Any]]:
        return [{"value": c.value, "name": c.name, "color": c.color} for c in self.classes]

    def describe(self) -> dict[str, Any]:
        d = {
            "id": self.job_id,
            "model": self.model,
            "kind": self.kind,
            "count": self.count,
            "band_names": self.band_names,
            "bounds": list(self.bounds),
            "minzoom": self.minzoom,
            "maxzoom": self.maxzoom,
            "native_zoom": self.native_zoom,
            "output": self.uri,
            "dtype": self.dtype,
            "renders": self.renders,
            "default_render": self.default_render,
        }
        if self.classes:
            d["classes"] = self.legend()
        return d


def _hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _inward(bounds: tuple[float, float, float, float], digits: int = 7) -> tuple[float, float, float, float]:
    """Bounds rounded towards the inside: outputs end exactly on tile edges, and bounds rounded
    outwards by 1e-7 degree make web maps ask for a row of tiles past the edge (all 404s)."""
    q = 10.0**digits
    w, s, e, n = bounds
    return math.ceil(w * q) / q, math.ceil(s * q) / q, math.floor(e * q) / q, math.floor(n * q) / q


def read_output(job: Job, settings: Settings) -> JobOutput:
    """Open the job's COG once and describe it."""
    uri = next((o for o in job.outputs if o.endswith(".tif")), None)
    if uri is None:
        raise OutputUnreadable(f"job {job.id} lists no COG among its outputs ({job.outputs})")
    try:
        return describe_cog(
            uri,
            settings,
            job_id=job.id,
            model=job.spec.model,
            version=job.timings.finished.isoformat() if job.timings.finished else None,
            written_by=job.id,
        )
    except rasterio.errors.RasterioIOError as e:
        raise OutputUnreadable(f"the output of job {job.id} cannot be read ({uri}): {e}") from e


def describe_cog(
    uri: str,
    settings: Settings,
    *,
    job_id: str,
    model: str = "",
    version: str | None = None,
    written_by: str | None = None,
) -> JobOutput:
    """An output COG of tilefm (its TILEFM_* tags) as `JobOutput`, served under `job_id`.
    `written_by`: the job whose TILEFM_JOB tag the file must carry. `RasterioIOError` where the
    file cannot be opened."""
    path = storage_for(uri, settings).rasterio_path(uri)
    with rasterio.Env(**gdal_env(settings)), rasterio.open(path) as src:
        tags = src.tags()
        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        levels = len(src.overviews(1))
        count, dtype, nodata = src.count, stored_dtype(src), src.nodata
        descriptions = [d or f"b{i + 1}" for i, d in enumerate(src.descriptions)]
    if written_by is not None and tags.get("TILEFM_JOB") != written_by:
        # whatever is at the key now, it is not this job's
        raise OutputUnreadable(f"the file at {uri} was not written by job {written_by}")
    card = ModelCard.model_validate_json(tags["TILEFM_CARD"]) if "TILEFM_CARD" in tags else None
    zoom = int(tags.get("TILEFM_ZOOM", 0))
    classes = [ClassInfo(c.value, c.name, c.color) for c in (card.output.classes if card else [])]
    return JobOutput(
        job_id=job_id,
        uri=uri,
        path=path,
        model=tags.get("TILEFM_MODEL", model),
        kind=tags.get("TILEFM_OUTPUT_KIND", "embedding"),
        count=count,
        band_names=descriptions,
        dtype=dtype,
        nodata=nodata,
        scale=float(tags.get("TILEFM_SCALE", 1.0)),
        offset=float(tags.get("TILEFM_OFFSET", 0.0)),
        native_zoom=zoom,
        minzoom=max(0, zoom - levels),
        maxzoom=min(24, zoom + OVERZOOM),
        bounds=_inward(bounds),
        classes=classes,
        scene=json.loads(tags.get("TILEFM_SCENE", "{}")) or {},
        created=tags.get("TILEFM_CREATED", ""),
        version=version or tags.get("TILEFM_CREATED", ""),
    )


class OutputResolver:
    """Job id -> `JobOutput`. Finished jobs never change, so they are kept (LRU) after the first
    lookup: tile requests cost no Redis round trip and no re-open of the COG's header."""

    def __init__(self, store: JobStore, settings: Settings, size: int = 256) -> None:
        self.store, self.settings, self.size = store, settings, size
        self._cache: OrderedDict[str, JobOutput] = OrderedDict()
        self._lock = threading.Lock()

    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)  # JobNotFound -> 404

    def __call__(self, job_id: str) -> JobOutput:
        with self._lock:
            out = self._cache.get(job_id)
            if out is not None:
                self._cache.move_to_end(job_id)
                return out
        job = self.store.get(job_id)
        if job.state != JobState.SUCCEEDED:
            raise JobNotFinished(job.id, job.state.value)
        out = read_output(job, self.settings)
        with self._lock:
            self._cache[job_id] = out
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return out
