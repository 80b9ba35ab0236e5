"""The tile server: job outputs and their input scenes as web-map tiles, plus TiTiler's generic COG
endpoints restricted to the configured storage, and the viewer.

Routes are thin: path and query parsing in dependencies, reading and rendering in
`tilefm.tiler`. Finished jobs never change, so their tiles are cached in memory and sent with
long-lived `Cache-Control: immutable` and an ETag.

Every data route (jobs, outputs, /cog) takes the same dependencies first: the API key where
`TILEFM_TILER_AUTH` is on, then the request guard (finite numbers, a bounded query string);
/cog adds its caps. The viewer's page and files, health and metrics stay open.

Why one module (~790 lines): it is the tile server's app factory, TiTiler-style: one function
per router (outputs, jobs, viewer, /cog), sharing the dependencies, caching and header helpers
defined at the top; the reading and rendering behind the routes live in `tilefm.tiler`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from rasterio.errors import RasterioIOError
from rio_tiler import errors as rio_errors

from tilefm import __version__, metrics
from tilefm.api import errors
from tilefm.api.auth import READ, KeyRing, presented_key
from tilefm.api.jobs import JOB_ID, _readiness  # importing api.jobs registers the `jobid` path convertor
from tilefm.api.middleware import BodyLimit, HTTPMetrics, settle_heap
from tilefm.engine.memory import release_large_arrays
from tilefm.jobs.models import JobState
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings, get_settings
from tilefm.tiler import render
from tilefm.tiler.cache import TileCache
from tilefm.tiler.errors import BadRenderParameter
from tilefm.tiler.limits import Limits, cog_guard, limited_reader, request_guard
from tilefm.tiler.outputs import JobOutput, OutputResolver
from tilefm.tiler.render import MEDIA_TYPES, RenderParams
from tilefm.tiler.security import allowed_path, check_public_url, public_base
from tilefm.tiler.tiles import OutputTiles, SceneTiles
from tilefm.tiler.wmts import capabilities

log = logging.getLogger(__name__)

IMMUTABLE = "max-age=31536000, immutable"
SHORT = "max-age=60"
#: the query parameter an API key may come in (besides the X-API-Key and Authorization headers);
#: never copied into the tile URLs of TileJSON or WMTS
API_KEY_PARAM = "api_key"


class TileFormat(StrEnum):
    png = "png"
    webp = "webp"
    jpg = "jpg"
    npy = "npy"
    tif = "tif"


class ImageFormat(StrEnum):
    png = "png"
    webp = "webp"
    jpg = "jpg"


class RenderName(StrEnum):
    classes = "classes"
    pca = "pca"
    rgb = "rgb"
    similarity = "similarity"
    raw = "raw"


class JobSummary(BaseModel):
    """What the viewer's job list shows of a finished job, and no more (no labels, no storage
    locations)."""

    id: str
    model: str
    created: str
    finished: str | None = None


class JobSummaries(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None


# ------------------------------------------------------------------------------------------------
# dependencies
# ------------------------------------------------------------------------------------------------


def job_output(request: Request, job_id: Annotated[str, JOB_ID]) -> JobOutput:
    """The succeeded job's output (404 unknown job, 409 not finished)."""
    out: JobOutput = request.app.state.resolver(job_id)
    return out


def render_params(
    request: Request,
    out: Annotated[JobOutput, Depends(job_output)],
    render_name: Annotated[
        RenderName | None,
        Query(
            alias="render",
            description=(
                "classes (class maps); pca, rgb or similarity (embeddings); raw. Default: classes or pca"
            ),
        ),
    ] = None,
    bands: Annotated[
        str | None, Query(description="rgb: one or three 1-based band numbers", examples=["1,2,3"])
    ] = None,
    rescale: Annotated[
        str | None, Query(description="min,max mapped to 0..255 (rgb, pca, similarity)", examples=["0,1"])
    ] = None,
    colormap_name: Annotated[
        str | None, Query(description="similarity: a rio-tiler colormap name", examples=["viridis"])
    ] = None,
    lon: Annotated[
        float | None, Query(ge=-180, le=180, description="similarity: the query pixel's longitude")
    ] = None,
    lat: Annotated[
        float | None, Query(ge=-85.06, le=85.06, description="similarity: the query pixel's latitude")
    ] = None,
    vector: Annotated[
        str | None, Query(max_length=20000, description="similarity: the query embedding, comma-separated")
    ] = None,
) -> RenderParams:
    tiles: OutputTiles = request.app.state.output_tiles
    return tiles.params(
        out, render_name.value if render_name else None, bands, rescale, colormap_name, lon, lat, vector
    )


def _etag(*parts: Any) -> str:
    return '"' + hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32] + '"'


def _cache_control(request: Request, policy: str, *, from_host: bool = False) -> str:
    """`policy` for shared caches only where anyone may read the answer (no keys) and it does
    not depend on the Host header; otherwise for the browser's own cache."""
    shared = not request.app.state.settings.tiler_auth and not from_host
    return f"{'public' if shared else 'private'}, {policy}"


def _document_headers(request: Request) -> dict[str, str]:
    """Cache headers of TileJSON and WMTS, whose URLs may follow the request's Host."""
    from_host = not request.app.state.public_url
    headers = {"Cache-Control": _cache_control(request, SHORT, from_host=from_host)}
    if from_host:
        headers["Vary"] = "Host"
    return headers


def _tile_response(
    request: Request, key: str, media_type: str, produce: Callable[[], bytes], route: str, fmt: str
) -> Response:
    """Serve from the ETag (304) or the cache, else render; time it for Prometheus."""
    t0 = time.perf_counter()
    etag = _etag(key)
    headers = {"ETag": etag, "Cache-Control": _cache_control(request, IMMUTABLE)}
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
    return public_base(request, request.app.state.public_url)


def _query(request: Request, drop: tuple[str, ...] = ()) -> str:
    """The request's query for a tile URL template, re-encoded (a value cannot end the URL or
    the XML attribute it goes into), without `drop` and without an API key."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k not in drop and k != API_KEY_PARAM]
    q = urlencode(items, safe=",")
    return f"?{q}" if q else ""


# ------------------------------------------------------------------------------------------------
# authentication and guards
# ------------------------------------------------------------------------------------------------


def tiler_auth(settings: Settings) -> Any:
    """The API key check of every data route, or None where `tiler_auth` is off. The keys are
    the job API's (`TILEFM_API_KEYS`), scope jobs:read; a key comes as X-API-Key, Authorization:
    Bearer, or `?api_key=` (for what cannot send headers; it ends up in access logs)."""
    if not settings.tiler_auth:
        return None
    if settings.auth_disabled:
        log.warning(
            "TILEFM_AUTH_DISABLED does not switch off the tiler's keys: TILEFM_TILER_AUTH=true asks for them"
        )
    ring = KeyRing(settings.model_copy(update={"auth_disabled": False}))

    async def dependency(request: Request) -> None:  # async: a hash and a compare need no thread
        key = presented_key(request) or request.query_params.get(API_KEY_PARAM) or None
        if key is None:
            raise HTTPException(
                401,
                "missing API key: send X-API-Key: KEY, Authorization: Bearer KEY or ?api_key=KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scopes = ring.scopes_for(key)
        if scopes is None:
            raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        if READ not in scopes:
            raise HTTPException(403, f"this API key lacks the scope {READ!r}")

    return Depends(dependency)


def data_dependencies(settings: Settings) -> list[Any]:
    """Key first (a request without one learns nothing about its parameters), then the guard."""
    auth = tiler_auth(settings)
    return [*([auth] if auth is not None else []), Depends(request_guard)]


# ------------------------------------------------------------------------------------------------
# routers
# ------------------------------------------------------------------------------------------------


def create_output_router() -> APIRouter:
    """Job outputs: `/v1/jobs/{id}/...`."""
    r = APIRouter(
        prefix="/v1/jobs/{job_id:jobid}",
        responses={
            **errors.RESPONSES,
            404: errors._doc("Unknown job, or a tile outside the output"),
            409: errors._doc("The job has not succeeded (yet)"),
        },
    )

    @r.get("/info")
    def info(out: Annotated[JobOutput, Depends(job_output)]) -> dict[str, Any]:
        """What the output holds: kind, bands, classes, bounds, zoom range, renderings."""
        return out.describe()

    @r.get("/tilejson.json")
    def tilejson(
        request: Request,
        job_id: Annotated[str, JOB_ID],
        out: Annotated[JobOutput, Depends(job_output)],
        p: Annotated[RenderParams, Depends(render_params)],
        tile_format: Annotated[
            TileFormat, Query(description="format of the tiles the template points at")
        ] = TileFormat.png,
        tile_scale: Annotated[int, Query(ge=1, le=4)] = 1,
    ) -> JSONResponse:
        """TileJSON 3.0 for the output with these rendering parameters (and a legend for class maps)."""
        scale = f"@{tile_scale}x" if tile_scale > 1 else ""
        query = _query(request, drop=("tile_format", "tile_scale"))
        w, s, e, n = out.bounds
        body: dict[str, Any] = {
            "tilejson": "3.0.0",
            "name": f"{out.model} ({p.render})",
            "version": __version__,
            "scheme": "xyz",
            "attribution": f"tilefm job {job_id}",
            "tiles": [
                f"{_base(request)}/v1/jobs/{job_id}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}{scale}.{tile_format.value}{query}"
            ],
            "minzoom": out.minzoom,
            "maxzoom": out.maxzoom,
            "bounds": [w, s, e, n],
            "center": [(w + e) / 2, (s + n) / 2, min(out.maxzoom, max(out.minzoom, out.native_zoom - 1))],
        }
        if out.is_classes:
            body["legend"] = out.legend()
        return JSONResponse(body, headers=_document_headers(request))

    def _tile(
        request: Request,
        job_id: str,
        tms: str,
        z: int,
        x: int,
        y: int,
        scale: int,
        fmt: TileFormat,
        out: JobOutput,
        p: RenderParams,
    ) -> Response:
        key = f"{job_id}|{out.version}|{tms}/{z}/{x}/{y}@{scale}.{fmt.value}|{p.key()}"
        tiles: OutputTiles = request.app.state.output_tiles
        return _tile_response(
            request,
            key,
            MEDIA_TYPES[fmt.value],
            lambda: tiles.tile(out, tms, z, x, y, scale, fmt.value, p),
            "output",
            fmt.value,
        )

    tile_doc: dict[str, Any] = {
        "responses": {
            200: {
                "content": {
                    "image/png": {},
                    "image/webp": {},
                    "image/jpeg": {},
                    "application/x-binary": {},
                    "image/tiff": {},
                },
                "description": "The rendered tile (png/webp/jpg) or its raw values (npy/tif)",
            }
        },
        "response_class": Response,
    }

    @r.get("/tiles/{tms}/{z:int}/{x:int}/{y:int}.{fmt}", **tile_doc)
    def tile(
        request: Request,
        job_id: Annotated[str, JOB_ID],
        tms: str,
        z: int,
        x: int,
        y: int,
        fmt: TileFormat,
        out: Annotated[JobOutput, Depends(job_output)],
        p: Annotated[RenderParams, Depends(render_params)],
    ) -> Response:
        """One XYZ tile. Raw formats carry the de-quantized values (float32, NaN = no data; class
        numbers as uint8, 255 = no data), or the similarity for `render=similarity`."""
        return _tile(request, job_id, tms, z, x, y, 1, fmt, out, p)

    @r.get("/tiles/{tms}/{z:int}/{x:int}/{y:int}@{scale:int}x.{fmt}", **tile_doc)
    def tile_scaled(
        request: Request,
        job_id: Annotated[str, JOB_ID],
        tms: str,
        z: int,
        x: int,
        y: int,
        scale: int,
        fmt: TileFormat,
        out: Annotated[JobOutput, Depends(job_output)],
        p: Annotated[RenderParams, Depends(render_params)],
    ) -> Response:
        """A tile of 256 x scale pixels (for high-DPI screens)."""
        return _tile(request, job_id, tms, z, x, y, scale, fmt, out, p)

    @r.get("/point/{lon},{lat}")
    def point(
        request: Request,
        out: Annotated[JobOutput, Depends(job_output)],
        lon: Annotated[float, Path(ge=-180, le=180)],
        lat: Annotated[float, Path(ge=-85.06, le=85.06)],
    ) -> JSONResponse:
        """The output's values at a position, de-quantized (null = no data), with the class name
        for class maps."""
        body = request.app.state.output_tiles.point(out, lon, lat)
        return JSONResponse(body, headers={"Cache-Control": _cache_control(request, IMMUTABLE)})

    @r.get("/statistics")
    def statistics(
        request: Request,
        out: Annotated[JobOutput, Depends(job_output)],
        bands: Annotated[
            str | None,
            Query(description="1-based band numbers, comma-separated (default all)", examples=["1,2,3"]),
        ] = None,
        max_size: Annotated[
            int | None,
            Query(
                ge=64,
                description="longest side read, px (default 1024, at most TILEFM_TILER_MAX_STATISTICS_PX)",
            ),
        ] = None,
    ) -> dict[str, Any]:
        """Per band: min/max/mean/std/percentiles of the de-quantized values, or class counts and
        fractions."""
        try:
            idx = [int(b) for b in bands.split(",")] if bands else None
        except ValueError:
            raise BadRenderParameter(
                f"bands must be comma-separated numbers, not {bands!r}", field="bands"
            ) from None
        tiles: OutputTiles = request.app.state.output_tiles
        return tiles.statistics(out, idx, max_size)

    @r.get("/preview.{fmt}", response_class=Response)
    def preview(
        request: Request,
        fmt: ImageFormat,
        out: Annotated[JobOutput, Depends(job_output)],
        p: Annotated[RenderParams, Depends(render_params)],
        max_size: Annotated[
            int | None,
            Query(ge=64, description="longest side, px (default 1024, at most TILEFM_TILER_MAX_PREVIEW_PX)"),
        ] = None,
    ) -> Response:
        """The whole output as one image."""
        max_size = request.app.state.output_tiles.preview_size(out, p, max_size)
        key = f"{out.job_id}|{out.version}|preview{max_size}.{fmt.value}|{p.key()}"
        return _tile_response(
            request,
            key,
            MEDIA_TYPES[fmt.value],
            lambda: request.app.state.output_tiles.preview(out, fmt.value, p, max_size),
            "preview",
            fmt.value,
        )

    @r.get(
        "/WMTSCapabilities.xml",
        response_class=Response,
        responses={200: {"content": {"application/xml": {}}}},
    )
    def wmts(
        request: Request,
        job_id: Annotated[str, JOB_ID],
        out: Annotated[JobOutput, Depends(job_output)],
        p: Annotated[RenderParams, Depends(render_params)],
        tile_format: ImageFormat = ImageFormat.png,
    ) -> Response:
        """WMTS capabilities of the output with these rendering parameters (QGIS: Layer > Add WMS/WMTS)."""
        query = _query(request, drop=("tile_format",))
        template = "{TileMatrix}/{TileCol}/{TileRow}"
        url = f"{_base(request)}/v1/jobs/{job_id}/tiles/WebMercatorQuad/{template}.{tile_format.value}{query}"
        xml = capabilities(
            title=f"tilefm {out.model} {p.render} ({job_id})",
            layer=f"{job_id}-{p.render}",
            bounds=out.bounds,
            minzoom=out.minzoom,
            maxzoom=out.maxzoom,
            tile_url=url,
            fmt=MEDIA_TYPES[tile_format.value],
        )
        return Response(xml, media_type="application/xml", headers=_document_headers(request))

    # --- the input scene, drawn the same way --------------------------------------------------

    @r.get("/scene/tilejson.json")
    def scene_tilejson(
        request: Request,
        job_id: Annotated[str, JOB_ID],
        out: Annotated[JobOutput, Depends(job_output)],
        rescale: Annotated[
            str | None, Query(examples=["0,3000"], description="reflectance x 10000 mapped to 0..255")
        ] = None,
        tile_format: ImageFormat = ImageFormat.png,
    ) -> JSONResponse:
        """TileJSON of the job's input scene in true colour (Sentinel-2 B04, B03, B02)."""
        render.parse_rescale(rescale)
        scene = request.app.state.scene_tiles.scene(out, _scene_sources(request, out))
        request.app.state.scene_tiles.bands(scene)  # 404 now if the scene has no true colour
        w, s, e, n = scene.footprint.bounds
        q = "?" + urlencode({"rescale": rescale}, safe=",") if rescale else ""
        return JSONResponse(
            {
                "tilejson": "3.0.0",
                "name": "input scene (true colour)",
                "scheme": "xyz",
                "tiles": [
                    f"{_base(request)}/v1/jobs/{job_id}/scene/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.{tile_format.value}{q}"
                ],
                "minzoom": out.minzoom,
                "maxzoom": out.maxzoom,
                "bounds": [w, s, e, n],
                "center": [(w + e) / 2, (s + n) / 2, out.native_zoom - 1],
            },
            headers=_document_headers(request),
        )

    @r.get("/scene/tiles/{tms}/{z:int}/{x:int}/{y:int}.{fmt}", response_class=Response)
    def scene_tile(
        request: Request,
        job_id: Annotated[str, JOB_ID],
        tms: str,
        z: int,
        x: int,
        y: int,
        fmt: ImageFormat,
        out: Annotated[JobOutput, Depends(job_output)],
        rescale: Annotated[str | None, Query(examples=["0,3000"])] = None,
    ) -> Response:
        """A true-colour tile of the input scene."""
        resc = render.parse_rescale(rescale)
        st: SceneTiles = request.app.state.scene_tiles
        key = f"{job_id}|{out.version}|scene|{tms}/{z}/{x}/{y}.{fmt.value}|{resc}"
        return _tile_response(
            request,
            key,
            MEDIA_TYPES[fmt.value],
            lambda: st.tile(
                out, st.scene(out, _scene_sources(request, out)), tms, z, x, y, 1, fmt.value, resc
            ),
            "scene",
            fmt.value,
        )

    return r


def _scene_sources(request: Request, out: JobOutput) -> dict[str, str]:
    job = request.app.state.resolver.job(out.job_id)
    return dict(job.spec.scene)


def create_jobs_router() -> APIRouter:
    r = APIRouter(prefix="/v1", responses=errors.RESPONSES)

    @r.get("/jobs", response_model=JobSummaries)
    def list_jobs(
        request: Request,
        state: Annotated[
            Literal["succeeded"], Query(description="only finished jobs are listed")
        ] = "succeeded",
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> JobSummaries:
        """Succeeded jobs (newest first) for the viewer to pick from: id, model and times only.
        Off (404) when `TILEFM_TILER_LIST_JOBS` is false."""
        if not request.app.state.settings.tiler_list_jobs:
            raise HTTPException(404, "listing jobs is switched off on this tiler (TILEFM_TILER_LIST_JOBS)")
        jobs, nxt = request.app.state.store.list(state=JobState.SUCCEEDED, limit=limit, cursor=cursor)
        return JobSummaries(
            jobs=[
                JobSummary(
                    id=j.id,
                    model=j.spec.model,
                    created=j.timings.created.isoformat(),
                    finished=j.timings.finished.isoformat() if j.timings.finished else None,
                )
                for j in jobs
                if j.state == JobState.SUCCEEDED
            ],
            next_cursor=nxt,
        )

    return r


def create_viewer_router(viewer_dir: FilePath, *, files: bool = False) -> APIRouter:
    """The viewer's page and assets. MapLibre comes from the viewer's own node_modules (npm), not a CDN.
    `files`: the page of `tilefm view` (/viewer/files, every file served at once) in place of the
    job pages."""
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
            raise HTTPException(
                503,
                "the viewer's MapLibre files are missing: run `make viewer` (npm ci in "
                "services/tiler/viewer)",
            )
        return _file(static, "index.html")

    if files:

        @r.get("/viewer/files")
        def viewer_files() -> FileResponse:
            return _page()

    else:

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


def mount_cog_endpoints(app: FastAPI, settings: Settings, dependencies: list[Any]) -> None:
    """TiTiler's generic COG endpoints at /cog, for datasets under the configured prefixes only,
    held to the tiler's caps (`tilefm.tiler.limits`). Without TiTiler's post-processing
    algorithms (each brings sizes of its own) and its map.html page (the tiler has its viewer)."""
    from titiler.core.factory import TilerFactory

    from tilefm.storage import gdal_env

    prefixes = settings.tiler_prefixes or settings.allowed_outputs
    limits = Limits.from_settings(settings)

    def cog_path(
        url: Annotated[
            str, Query(description="s3://bucket/key.tif or a path, under the tiler's storage prefixes")
        ],
    ) -> str:
        return allowed_path(url, prefixes, settings)

    def cog_limits(request: Request) -> None:
        cog_guard(limits, request)

    class Factory(TilerFactory):
        def url_for(self, request: Request, name: str, **path_params: Any) -> str:
            """URLs (TileJSON's tiles) on the tiler's public base, never the request's Host."""
            return (
                public_base(request, request.app.state.public_url)
                + self.router_prefix
                + str(self.router.url_path_for(name, **path_params))
            )

    env = gdal_env(settings)
    factory = Factory(
        router_prefix="/cog",
        reader=limited_reader(limits),
        path_dependency=cog_path,
        environment_dependency=lambda: env,
        process_dependency=lambda: None,
        add_viewer=False,
    )
    app.include_router(
        factory.router,
        prefix="/cog",
        tags=["Cloud Optimized GeoTIFF (restricted)"],
        dependencies=[*dependencies, Depends(cog_limits)],
    )


#: rio-tiler's and TiTiler's errors on /cog: what the request asked for, so a 4xx naming the
#: parameter where one is to blame (TiTiler's own table answers 500 for most of them)
RIO_TILER_ERRORS: list[tuple[type[Exception], int, str | None]] = [
    (rio_errors.TileOutsideBounds, 404, "z"),
    (rio_errors.PointOutsideBounds, 404, "lon"),
    (rio_errors.InvalidBufferSize, 422, "buffer"),
    (rio_errors.InvalidExpression, 422, "expression"),
    (rio_errors.MissingBands, 422, "bidx"),
    (rio_errors.InvalidBandName, 422, "bidx"),
    (rio_errors.InvalidFormat, 422, "format"),
    (rio_errors.InvalidColorMapName, 422, "colormap_name"),
    (rio_errors.InvalidColorFormat, 422, "colormap"),
    (rio_errors.InvalidBounds, 422, "bbox"),
    (rio_errors.RioTilerError, 422, None),
]


def install_cog_errors(app: FastAPI) -> None:
    from titiler.core.errors import BadRequestError, TileNotFoundError

    def handler(status: int, field: str | None) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(
                errors.error_body(status, str(exc) or type(exc).__name__, field), status_code=status
            )

        return handle

    handled: list[tuple[type[Exception], int, str | None]] = [
        *RIO_TILER_ERRORS,
        (BadRequestError, 400, None),
        (TileNotFoundError, 404, "z"),
    ]
    for cls, status, field in handled:
        app.add_exception_handler(cls, handler(status, field))


def create_app(
    settings: Settings | None = None, *, store: JobStore | None = None, viewer_dir: FilePath | None = None
) -> FastAPI:
    settings = settings or get_settings()
    public_url = check_public_url(settings.tiler_public_url) if settings.tiler_public_url else None
    store = store or JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    if settings.tiler_gdal_cache_mb and "GDAL_CACHEMAX" not in os.environ:
        # read by GDAL when its block cache is first used: before this process reads anything
        os.environ["GDAL_CACHEMAX"] = str(settings.tiler_gdal_cache_mb)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.tiler_threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.tiler_threads
        release_large_arrays()  # reads of tens of MiB come and go: their memory goes back at once
        settle_heap()
        yield

    app = FastAPI(
        title="tilefm tiles",
        version=__version__,
        lifespan=lifespan,
        description=(
            "Finished jobs' outputs and input scenes as web-map tiles (XYZ, TileJSON, WMTS), values at "
            "points, and a viewer."
        ),
    )
    app.state.settings = settings
    app.state.public_url = public_url
    app.state.store = store
    app.state.resolver = OutputResolver(store, settings)
    app.state.output_tiles = OutputTiles(settings)
    app.state.scene_tiles = SceneTiles(settings)
    app.state.tile_cache = TileCache(settings.tiler_cache_mb * 1024 * 1024)
    errors.install(app)
    install_cog_errors(app)  # rio-tiler's errors on /cog: 4xx naming the parameter, not 500

    @app.exception_handler(RasterioIOError)
    async def _unreadable(_: Request, exc: RasterioIOError) -> JSONResponse:
        # a dataset under the allowed prefixes that is missing or unreadable: the user's URL, not a bug
        return JSONResponse(
            errors.error_body(404, f"the dataset cannot be opened: {exc}", "url"), status_code=404
        )

    app.add_middleware(
        BodyLimit, max_bytes=settings.api_max_body_bytes
    )  # the POST routes of /cog take GeoJSON
    app.add_middleware(
        GZipMiddleware,
        minimum_size=1000,
        exclude_content_types=(
            "text/event-stream",
            "image/png",
            "image/jpeg",
            "image/webp",
            "image/tiff",
            "application/x-binary",
        ),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET"],
            allow_headers=["*"],
            expose_headers=["ETag"],
        )
    guarded = data_dependencies(settings)
    app.include_router(create_jobs_router(), dependencies=guarded)
    app.include_router(create_output_router(), dependencies=guarded)
    mount_cog_endpoints(app, settings, guarded)
    if viewer_dir is not None:
        app.include_router(create_viewer_router(viewer_dir))

    app.add_middleware(HTTPMetrics)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Redis and the object store are reachable."""
        checks = _readiness(settings, store)
        checks.pop("ray", None)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
        )

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
