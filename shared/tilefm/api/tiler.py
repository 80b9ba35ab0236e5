"""The tile server: job outputs and their input scenes as web-map tiles, plus TiTiler's generic COG
endpoints restricted to the configured storage, and the viewer.

Routes are thin: path and query parsing in dependencies, reading and rendering in
`tilefm.tiler`. Finished jobs never change, so their tiles are cached in memory and sent with
long-lived `Cache-Control: immutable` and an ETag.
"""

from __future__ import annotations

import hashlib
from contextlib import asynccontextmanager
import logging
import time
from enum import Enum
from pathlib import Path as FilePath
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from rasterio.errors import RasterioIOError

from tilefm import __version__, metrics
from tilefm.api import errors
from tilefm.api.middleware import HTTPMetrics, settle_heap
from tilefm.api.jobs import JOB_ID, _readiness  # importing api.jobs registers the `jobid` path convertor
from tilefm.jobs.models import JobState
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings, get_settings
from tilefm.tiler import render
from tilefm.tiler.cache import TileCache
from tilefm.tiler.errors import BadRenderParameter
from tilefm.tiler.outputs import JobOutput, OutputResolver
from tilefm.tiler.render import MEDIA_TYPES, RenderParams
from tilefm.tiler.security import allowed_path
from tilefm.tiler.tiles import OutputTiles, SceneTiles
from tilefm.tiler.wmts import capabilities

log = logging.getLogger(__name__)

IMMUTABLE = "public, max-age=31536000, immutable"
SHORT = "public, max-age=60"


class TileFormat(str, Enum):
    png = "png"
    webp = "webp"
    jpg = "jpg"
    npy = "npy"
    tif = "tif"


class ImageFormat(str, Enum):
    png = "png"
    webp = "webp"
    jpg = "jpg"


class RenderName(str, Enum):
    classes = "classes"
    pca = "pca"
    rgb = "rgb"
    similarity = "similarity"
    raw = "raw"


class JobSummary(BaseModel):
    id: str
    state: JobState
    model: str
    created: str
    finished: str | None = None
    outputs: list[str]
    labels: dict[str, str]


class JobSummaries(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None


# ------------------------------------------------------------------------------------------------
# dependencies
# ------------------------------------------------------------------------------------------------


def job_output(request: Request, job_id: Annotated[str, JOB_ID]) -> JobOutput:
    """The succeeded job's output (404 unknown job, 409 not finished)."""
    return request.app.state.resolver(job_id)


def render_params(
    request: Request,
    out: Annotated[JobOutput, Depends(job_output)],
    render_name: Annotated[RenderName | None, Query(alias="render", description="classes (class maps); pca, rgb or similarity (embeddings); raw. Default: classes or pca")] = None,
    bands: Annotated[str | None, Query(description="rgb: one or three 1-based band numbers", examples=["1,2,3"])] = None,
    rescale: Annotated[str | None, Query(description="min,max mapped to 0..255 (rgb, pca, similarity)", examples=["0,1"])] = None,
    colormap_name: Annotated[str | None, Query(description="similarity: a rio-tiler colormap name", examples=["viridis"])] = None,
    lon: Annotated[float | None, Query(ge=-180, le=180, description="similarity: the query pixel's longitude")] = None,
    lat: Annotated[float | None, Query(ge=-85.06, le=85.06, description="similarity: the query pixel's latitude")] = None,
    vector: Annotated[str | None, Query(max_length=20000, description="similarity: the query embedding, comma-separated")] = None,
) -> RenderParams:
    tiles: OutputTiles = request.app.state.output_tiles
    return tiles.params(out, render_name.value if render_name else None, bands, rescale, colormap_name, lon, lat, vector)


def _etag(*parts: Any) -> str:
    return '"' + hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32] + '"'


def _tile_response(request: Request, key: str, media_type: str, produce, route: str, fmt: str) -> Response:
    """Serve from the ETag (304) or the cache, else render; time it for Prometheus."""
    t0 = time.perf_counter()
    etag = _etag(key)
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if request.headers.get("if-none-match") == etag:
        metrics.tile_cache.labels("not_modified").inc()
        return Response(status_code=304, headers=headers)
    cache: TileCache = request.app.state.tile_cache
    data = cache.get(key)
    if data is None:
        metrics.tile_cache.labels("miss").inc()
        data = produce()
        cache.put(key, data)
    else:
        metrics.tile_cache.labels("hit").inc()
    metrics.tile_seconds.labels(route, fmt).observe(time.perf_counter() - t0)
    return Response(data, media_type=media_type, headers=headers)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _query(request: Request, drop: tuple[str, ...] = ()) -> str:
    q = "&".join(f"{k}={v}" for k, v in request.query_params.multi_items() if k not in drop)
    return f"?{q}" if q else ""


# ------------------------------------------------------------------------------------------------
# routers
# ------------------------------------------------------------------------------------------------


def create_output_router() -> APIRouter:
    """Job outputs: `/v1/jobs/{id}/...`."""
    r = APIRouter(prefix="/v1/jobs/{job_id:jobid}", responses={**errors.RESPONSES, 404: errors._doc("Unknown job, or a tile outside the output"),
                                                               409: errors._doc("The job has not succeeded (yet)")})

    @r.get("/info")
    def info(out: Annotated[JobOutput, Depends(job_output)]) -> dict:
        """What the output holds: kind, bands, classes, bounds, zoom range, renderings."""
        return out.describe()

    @r.get("/tilejson.json")
    def tilejson(request: Request, job_id: Annotated[str, JOB_ID], out: Annotated[JobOutput, Depends(job_output)],
                 p: Annotated[RenderParams, Depends(render_params)],
                 tile_format: Annotated[TileFormat, Query(description="format of the tiles the template points at")] = TileFormat.png,
                 tile_scale: Annotated[int, Query(ge=1, le=4)] = 1) -> JSONResponse:
        """TileJSON 3.0 for the output with these rendering parameters (and a legend for class maps)."""
        scale = f"@{tile_scale}x" if tile_scale > 1 else ""
        query = _query(request, drop=("tile_format", "tile_scale"))
        w, s, e, n = out.bounds
        body: dict[str, Any] = {
            "tilejson": "3.0.0", "name": f"{out.model} ({p.render})", "version": __version__,
            "scheme": "xyz", "attribution": f"tilefm job {job_id}",
            "tiles": [f"{_base(request)}/v1/jobs/{job_id}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}{scale}.{tile_format.value}{query}"],
            "minzoom": out.minzoom, "maxzoom": out.maxzoom, "bounds": [w, s, e, n],
            "center": [(w + e) / 2, (s + n) / 2, min(out.maxzoom, max(out.minzoom, out.native_zoom - 1))],
        }
        if out.is_classes:
            body["legend"] = out.legend()
        return JSONResponse(body, headers={"Cache-Control": SHORT})

    def _tile(request: Request, job_id: str, tms: str, z: int, x: int, y: int, scale: int, fmt: TileFormat,
              out: JobOutput, p: RenderParams) -> Response:
        key = f"{job_id}|{out.version}|{tms}/{z}/{x}/{y}@{scale}.{fmt.value}|{p.key()}"
        tiles: OutputTiles = request.app.state.output_tiles
        return _tile_response(request, key, MEDIA_TYPES[fmt.value],
                              lambda: tiles.tile(out, tms, z, x, y, scale, fmt.value, p), "output", fmt.value)

    tile_doc = {"responses": {200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}, "application/x-binary": {}, "image/tiff": {}},
                                    "description": "The rendered tile (png/webp/jpg) or its raw values (npy/tif)"}},
                "response_class": Response}

    @r.get("/tiles/{tms}/{z:int}/{x:int}/{y:int}.{fmt}", **tile_doc)
    def tile(request: Request, job_id: Annotated[str, JOB_ID], tms: str, z: int, x: int, y: int, fmt: TileFormat,
             out: Annotated[JobOutput, Depends(job_output)], p: Annotated[RenderParams, Depends(render_params)]) -> Response:
        """One XYZ tile. Raw formats carry the de-quantized values (float32, NaN = no data; class
        numbers as uint8, 255 = no data), or the similarity for `render=similarity`."""
        return _tile(request, job_id, tms, z, x, y, 1, fmt, out, p)

    @r.get("/tiles/{tms}/{z:int}/{x:int}/{y:int}@{scale:int}x.{fmt}", **tile_doc)
    def tile_scaled(request: Request, job_id: Annotated[str, JOB_ID], tms: str, z: int, x: int, y: int, scale: int, fmt: TileFormat,
                    out: Annotated[JobOutput, Depends(job_output)], p: Annotated[RenderParams, Depends(render_params)]) -> Response:
        """A tile of 256 x scale pixels (for high-DPI screens)."""
        return _tile(request, job_id, tms, z, x, y, scale, fmt, out, p)

    @r.get("/point/{lon},{lat}")
    def point(request: Request, out: Annotated[JobOutput, Depends(job_output)],
              lon: Annotated[float, Path(ge=-180, le=180)], lat: Annotated[float, Path(ge=-85.06, le=85.06)]) -> JSONResponse:
        """The output's values at a position, de-quantized (null = no data), with the class name for class maps."""
        body = request.app.state.output_tiles.point(out, lon, lat)
        return JSONResponse(body, headers={"Cache-Control": IMMUTABLE})

    @r.get("/statistics")
    def statistics(request: Request, out: Annotated[JobOutput, Depends(job_output)],
                   bands: Annotated[str | None, Query(description="1-based band numbers, comma-separated (default all)", examples=["1,2,3"])] = None,
                   max_size: Annotated[int, Query(ge=64, le=2048)] = 1024) -> dict:
        """Per band: min/max/mean/std/percentiles of the de-quantized values, or class counts and fractions."""
        try:
            idx = [int(b) for b in bands.split(",")] if bands else None
        except ValueError:
            raise BadRenderParameter(f"bands must be comma-separated numbers, not {bands!r}", field="bands") from None
        return request.app.state.output_tiles.statistics(out, idx, max_size)

    @r.get("/preview.{fmt}", response_class=Response)
    def preview(request: Request, fmt: ImageFormat, out: Annotated[JobOutput, Depends(job_output)],
                p: Annotated[RenderParams, Depends(render_params)], max_size: Annotated[int, Query(ge=64, le=2048)] = 1024) -> Response:
        """The whole output as one image."""
        key = f"{out.job_id}|{out.version}|preview{max_size}.{fmt.value}|{p.key()}"
        return _tile_response(request, key, MEDIA_TYPES[fmt.value],
                              lambda: request.app.state.output_tiles.preview(out, fmt.value, p, max_size), "preview", fmt.value)

    @r.get("/WMTSCapabilities.xml", response_class=Response, responses={200: {"content": {"application/xml": {}}}})
    def wmts(request: Request, job_id: Annotated[str, JOB_ID], out: Annotated[JobOutput, Depends(job_output)],
             p: Annotated[RenderParams, Depends(render_params)], tile_format: ImageFormat = ImageFormat.png) -> Response:
        """WMTS capabilities of the output with these rendering parameters (QGIS: Layer > Add WMS/WMTS)."""
        query = _query(request, drop=("tile_format",))
        url = f"{_base(request)}/v1/jobs/{job_id}/tiles/WebMercatorQuad/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{tile_format.value}{query}"
        xml = capabilities(title=f"tilefm {out.model} {p.render} ({job_id})", layer=f"{job_id}-{p.render}", bounds=out.bounds,
                           minzoom=out.minzoom, maxzoom=out.maxzoom, tile_url=url, fmt=MEDIA_TYPES[tile_format.value])
        return Response(xml, media_type="application/xml", headers={"Cache-Control": SHORT})

    # --- the input scene, drawn the same way --------------------------------------------------

    @r.get("/scene/tilejson.json")
    def scene_tilejson(request: Request, job_id: Annotated[str, JOB_ID], out: Annotated[JobOutput, Depends(job_output)],
                       rescale: Annotated[str | None, Query(examples=["0,3000"], description="reflectance x 10000 mapped to 0..255")] = None,
                       tile_format: ImageFormat = ImageFormat.png) -> JSONResponse:
        """TileJSON of the job's input scene in true colour (Sentinel-2 B04, B03, B02)."""
        render.parse_rescale(rescale)
        scene = request.app.state.scene_tiles.scene(out, _scene_sources(request, out))
        request.app.state.scene_tiles.bands(scene)  # 404 now if the scene has no true colour
        w, s, e, n = scene.footprint.bounds
        q = f"?rescale={rescale}" if rescale else ""
        return JSONResponse({
            "tilejson": "3.0.0", "name": "input scene (true colour)", "scheme": "xyz",
            "tiles": [f"{_base(request)}/v1/jobs/{job_id}/scene/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.{tile_format.value}{q}"],
            "minzoom": out.minzoom, "maxzoom": out.maxzoom, "bounds": [w, s, e, n],
            "center": [(w + e) / 2, (s + n) / 2, out.native_zoom - 1],
        }, headers={"Cache-Control": SHORT})

    @r.get("/scene/tiles/{tms}/{z:int}/{x:int}/{y:int}.{fmt}", response_class=Response)
    def scene_tile(request: Request, job_id: Annotated[str, JOB_ID], tms: str, z: int, x: int, y: int, fmt: ImageFormat,
                   out: Annotated[JobOutput, Depends(job_output)], rescale: Annotated[str | None, Query(examples=["0,3000"])] = None) -> Response:
        """A true-colour tile of the input scene."""
        resc = render.parse_rescale(rescale)
        st: SceneTiles = request.app.state.scene_tiles
        key = f"{job_id}|{out.version}|scene|{tms}/{z}/{x}/{y}.{fmt.value}|{resc}"
        return _tile_response(request, key, MEDIA_TYPES[fmt.value],
                              lambda: st.tile(out, st.scene(out, _scene_sources(request, out)), tms, z, x, y, 1, fmt.value, resc),
                              "scene", fmt.value)

    return r


def _scene_sources(request: Request, out: JobOutput) -> dict[str, str]:
    job = request.app.state.resolver.job(out.job_id)
    return dict(job.spec.scene)


def create_jobs_router() -> APIRouter:
    r = APIRouter(prefix="/v1", responses=errors.RESPONSES)

    @r.get("/jobs", response_model=JobSummaries)
    def list_jobs(request: Request, state: Annotated[JobState | None, Query(examples=["succeeded"])] = JobState.SUCCEEDED,
                  limit: Annotated[int, Query(ge=1, le=100)] = 50,
                  cursor: Annotated[str | None, Query(max_length=200)] = None) -> JobSummaries:
        """Jobs (newest first) for the viewer to pick from; off when `TILEFM_TILER_LIST_JOBS` is false."""
        if not request.app.state.settings.tiler_list_jobs:
            raise HTTPException(404, "listing jobs is switched off on this tiler (TILEFM_TILER_LIST_JOBS)")
        jobs, nxt = request.app.state.store.list(state=state, limit=limit, cursor=cursor)
        return JobSummaries(jobs=[JobSummary(
            id=j.id, state=j.state, model=j.spec.model, created=j.timings.created.isoformat(),
            finished=j.timings.finished.isoformat() if j.timings.finished else None, outputs=j.outputs, labels=j.spec.labels,
        ) for j in jobs], next_cursor=nxt)

    return r


def create_viewer_router(viewer_dir: FilePath) -> APIRouter:
    """The viewer's page and assets. MapLibre comes from the viewer's own node_modules (npm), not a CDN."""
    r = APIRouter(include_in_schema=False)
    static = viewer_dir.resolve()
    vendor = (viewer_dir / "node_modules" / "maplibre-gl" / "dist").resolve()

    def _file(base: FilePath, name: str) -> FileResponse:
        path = (base / name).resolve()
        if path.parent != base or not path.is_file():
            raise HTTPException(404, f"no viewer file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    def _page() -> FileResponse:
        if not vendor.is_dir():
            raise HTTPException(503, "the viewer's MapLibre files are missing: run `make viewer` (npm ci in services/tiler/viewer)")
        return _file(static, "index.html")

    @r.get("/viewer")
    def viewer() -> FileResponse:
        return _page()

    @r.get("/viewer/jobs/{job_id}")
    def viewer_job(job_id: Annotated[str, JOB_ID]) -> FileResponse:
        return _page()

    @r.get("/viewer/static/{name}")
    def viewer_static(name: str) -> FileResponse:
        return _file(static, name)

    @r.get("/viewer/vendor/{name}")
    def viewer_vendor(name: str) -> FileResponse:
        return _file(vendor, name)

    return r


def mount_cog_endpoints(app: FastAPI, settings: Settings) -> None:
    """TiTiler's generic COG endpoints at /cog, for datasets under the configured prefixes only."""
    from titiler.core.factory import TilerFactory

    from tilefm.storage import gdal_env

    prefixes = settings.tiler_prefixes or settings.allowed_outputs

    def cog_path(url: Annotated[str, Query(description="s3://bucket/key.tif or a path, under the tiler's storage prefixes")]) -> str:
        return allowed_path(url, prefixes, settings)

    env = gdal_env(settings)
    factory = TilerFactory(router_prefix="/cog", path_dependency=cog_path, environment_dependency=lambda: env)
    app.include_router(factory.router, prefix="/cog", tags=["Cloud Optimized GeoTIFF (restricted)"])


def create_app(settings: Settings | None = None, *, store: JobStore | None = None, viewer_dir: FilePath | None = None) -> FastAPI:
    settings = settings or get_settings()
    store = store or JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if settings.tiler_threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.tiler_threads
        settle_heap()
        yield

    app = FastAPI(title="tilefm tiles", version=__version__, lifespan=lifespan,
                  description="Finished jobs' outputs and input scenes as web-map tiles (XYZ, TileJSON, WMTS), values at points, and a viewer.")
    app.state.settings = settings
    app.state.store = store
    app.state.resolver = OutputResolver(store, settings)
    app.state.output_tiles = OutputTiles(settings)
    app.state.scene_tiles = SceneTiles(settings)
    app.state.tile_cache = TileCache(settings.tiler_cache_mb * 1024 * 1024)
    errors.install(app)
    from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers

    add_exception_handlers(app, DEFAULT_STATUS_CODES)  # rio-tiler's errors on /cog: 4xx, not 500

    @app.exception_handler(RasterioIOError)
    async def _unreadable(_: Request, exc: RasterioIOError) -> JSONResponse:
        # a dataset under the allowed prefixes that is missing or unreadable: the user's URL, not a bug
        return JSONResponse(errors.error_body(404, f"the dataset cannot be opened: {exc}", "url"), status_code=404)
    app.add_middleware(GZipMiddleware, minimum_size=1000, exclude_content_types=(
        "text/event-stream", "image/png", "image/jpeg", "image/webp", "image/tiff", "application/x-binary"))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET"], allow_headers=["*"],
                           expose_headers=["ETag"])
    app.include_router(create_jobs_router())
    app.include_router(create_output_router())
    mount_cog_endpoints(app, settings)
    if viewer_dir is not None:
        app.include_router(create_viewer_router(viewer_dir))

    app.add_middleware(HTTPMetrics)

    @app.get("/healthz")
    def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Redis and the object store are reachable."""
        checks = _readiness(settings, store)
        checks.pop("ray", None)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
