"""`tilefm view`: the viewer over COG files named on the command line, on 127.0.0.1.

Each file is checked up front (it exists, it is a Cloud-Optimized GeoTIFF, `tilefm run` wrote it)
and served under an id of its own through the tiler's output routes (`/v1/jobs/{id}/...`: tiles,
TileJSON with the legend of class maps, values at points, PCA and similarity for embeddings), with
the tiler's caps. Nothing else is reachable: no job store, no /cog endpoints, no input scenes, no
other files; and bound to a loopback address, it answers only requests addressed to this machine
(a page elsewhere cannot reach it through a DNS name that points here).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import rasterio
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from rasterio.errors import RasterioIOError
from rio_cogeo.cogeo import cog_validate

from tilefm.errors import StorageError, TileFMError
from tilefm.settings import Settings
from tilefm.storage import FileLocation, gdal_env, parse_uri, storage_for
from tilefm.tiler.errors import TileNotAvailable
from tilefm.tiler.outputs import JobOutput, describe_cog
from tilefm.tiler.security import is_loopback_host

#: the port tried first when none is given
DEFAULT_PORT = 8090
#: the viewer's page and scripts (services/tiler/viewer in a source checkout)
VIEWER_DIR = Path(__file__).resolve().parents[3] / "services" / "tiler" / "viewer"
PAGE = "/viewer/files"


class ViewError(TileFMError):
    """A file `tilefm view` cannot show; `field` is the argument as given."""


def open_file(argument: str, settings: Settings) -> JobOutput:
    """The COG at `argument` (a path, file:// or s3:// URI) as a servable output, or `ViewError`
    naming the argument: missing, not a COG, or not an output of `tilefm run`."""
    try:
        loc = parse_uri(argument)
    except StorageError as e:
        raise ViewError(Exception.__str__(e), field=argument) from None
    version = ""
    if isinstance(loc, FileLocation):
        if not loc.path.exists():
            raise ViewError("no such file", field=argument)
        if not loc.path.is_file():
            raise ViewError("not a file", field=argument)
        st = loc.path.stat()
        uri = loc.path.resolve().as_uri()
        version = f"{st.st_mtime_ns}-{st.st_size}"  # a file written again gets new tile URLs
    else:
        uri = argument
        try:
            found = storage_for(uri, settings).exists(uri)
        except StorageError as e:
            raise ViewError(
                f"cannot reach the object store: {Exception.__str__(e)}", field=argument
            ) from None
        if not found:
            raise ViewError("no such object", field=argument)
    path = storage_for(uri, settings).rasterio_path(uri)
    try:
        with rasterio.Env(**gdal_env(settings)):
            valid, problems, _ = cog_validate(path, quiet=True)
            with rasterio.open(path) as src:
                tags = src.tags()
    except RasterioIOError as e:
        raise ViewError(f"not a raster GDAL can read ({e})", field=argument) from None
    if not valid:
        raise ViewError(f"not a Cloud-Optimized GeoTIFF ({'; '.join(problems) or 'invalid'})", field=argument)
    if "TILEFM_ZOOM" not in tags:
        raise ViewError(
            "not an output of `tilefm run` (no TILEFM_ZOOM tag): tilefm view shows tilefm's COGs",
            field=argument,
        )
    version = version or tags.get("TILEFM_CREATED", "")
    file_id = hashlib.sha256(f"{uri}|{version}".encode()).hexdigest()[:32]
    try:
        return describe_cog(uri, settings, job_id=file_id, version=version)
    except RasterioIOError as e:
        raise ViewError(f"cannot be read ({e})", field=argument) from None


def open_files(arguments: list[str], settings: Settings) -> list[JobOutput]:
    """Every argument opened, in order, each file once."""
    outputs: dict[str, JobOutput] = {}
    for argument in arguments:
        out = open_file(argument, settings)
        outputs.setdefault(out.job_id, out)
    return list(outputs.values())


class FileResolver:
    """Id -> output, for the named files only (the tiler's `OutputResolver` without a job store)."""

    def __init__(self, outputs: list[JobOutput]) -> None:
        self.outputs = {o.job_id: o for o in outputs}

    def __call__(self, file_id: str) -> JobOutput:
        out = self.outputs.get(file_id)
        if out is None:
            raise TileNotAvailable(f"no file with id {file_id!r} is served here", field="id")
        return out

    def job(self, file_id: str) -> Any:
        raise TileNotAvailable(
            "tilefm view serves the files named on its command line, not their input scenes", field="scene"
        )


class LoopbackOnly:
    """Answers requests whose Host is this machine (localhost, 127.0.0.0/8, [::1]); others 400."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not is_loopback_host(host):
                from tilefm.api.errors import error_body

                response = JSONResponse(
                    error_body(400, f"this viewer answers on localhost only, not for Host {host!r}", "host"),
                    status_code=400,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_viewer(viewer_dir: Path = VIEWER_DIR) -> Path:
    """The viewer's folder, with its MapLibre files (`make viewer`)."""
    if not (viewer_dir / "index.html").is_file():
        raise TileFMError(f"the viewer's files are not at {viewer_dir} (a source checkout has them)")
    if not (viewer_dir / "node_modules" / "maplibre-gl" / "dist").is_dir():
        raise TileFMError(
            "the viewer's MapLibre files are missing: run `make viewer` (npm ci in services/tiler/viewer)"
        )
    return viewer_dir


def create_view_app(
    outputs: list[JobOutput], settings: Settings, viewer_dir: Path = VIEWER_DIR, *, loopback_only: bool = True
) -> FastAPI:
    """The viewer and the tiler's output routes over `outputs` only."""
    from tilefm import __version__
    from tilefm.api import errors
    from tilefm.api.tiler import create_output_router, create_viewer_router, data_dependencies
    from tilefm.tiler.cache import TileCache
    from tilefm.tiler.tiles import OutputTiles, SceneTiles

    app = FastAPI(title="tilefm view", version=__version__, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.public_url = None
    app.state.resolver = FileResolver(outputs)
    app.state.output_tiles = OutputTiles(settings, store_stats=False)  # write nothing beside the files
    app.state.scene_tiles = SceneTiles(settings)  # never reached: FileResolver.job answers 404 first
    app.state.tile_cache = TileCache(settings.tiler_cache_mb * 1024 * 1024)
    errors.install(app)

    @app.exception_handler(RasterioIOError)
    async def _unreadable(_: Request, exc: RasterioIOError) -> JSONResponse:
        return JSONResponse(errors.error_body(404, f"the file cannot be read: {exc}", "id"), status_code=404)

    guarded = data_dependencies(settings)
    files = APIRouter(prefix="/v1")

    @files.get("/files")
    def list_files() -> dict[str, Any]:
        """The files served, in the order they were named: id, name, model, kind."""
        return {
            "files": [
                {
                    "id": o.job_id,
                    "name": os.path.basename(o.uri),
                    "uri": o.uri,
                    "model": o.model,
                    "kind": o.kind,
                }
                for o in outputs
            ]
        }

    app.include_router(files, dependencies=guarded)
    app.include_router(create_output_router(), dependencies=guarded)
    app.include_router(create_viewer_router(viewer_dir, files=True))

    @app.get("/", include_in_schema=False)
    @app.get("/viewer", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse(PAGE)

    app.add_middleware(
        GZipMiddleware,
        minimum_size=1000,
        exclude_content_types=("image/png", "image/jpeg", "image/webp", "image/tiff", "application/x-binary"),
    )
    if loopback_only:
        app.add_middleware(LoopbackOnly)
    return app


def is_loopback_address(host: str) -> bool:
    return is_loopback_host(f"[{host}]" if ":" in host else host)


def bind(host: str, port: int | None) -> socket.socket:
    """A listening socket on host:port; without a port, DEFAULT_PORT if it is free, else any free
    port. `TileFMError` (field port) where the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [port] if port is not None else [DEFAULT_PORT, 0]
    for i, candidate in enumerate(candidates):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as e:
            sock.close()
            if i + 1 < len(candidates):
                continue
            raise TileFMError(
                f"cannot listen on {host}:{candidate}: {e.strerror or e}", field="port"
            ) from None
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    raise AssertionError("unreachable")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):  # noqa: S104 (listening everywhere: show a URL this machine opens)
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{PAGE}"


def can_open_browser() -> bool:
    """Whether a graphical browser is likely: without a display, Python's webbrowser falls back
    to a text browser that would take over the terminal."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("BROWSER"))


def warm(app: FastAPI, outputs: list[JobOutput]) -> threading.Thread:
    """Computes the embeddings' PCA projections in the background while the browser starts: the
    first tiles need them, and a 128-band file takes seconds. A failure is left to the tile
    requests to report."""
    tiles = app.state.output_tiles

    def run() -> None:
        for out in outputs:
            if not out.is_classes:
                try:
                    tiles.stats(out)
                except Exception:  # noqa: BLE001, S112 (the tiles that need them answer with the error)
                    continue

    thread = threading.Thread(target=run, name="tilefm-view-warm", daemon=True)
    thread.start()
    return thread


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on `sock` until interrupted."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
