"""The job API: a router factory over an injected `JobService`, and the app that wires it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, FastAPI, Header, Path, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from redis.asyncio import Redis as AsyncRedis
from starlette.convertors import Convertor, register_url_convertor

from tilefm import __version__, metrics
from tilefm.api import errors
from tilefm.api.auth import READ, WRITE, KeyRing, require
from tilefm.api.middleware import BodyLimit, HTTPMetrics, settle_heap
from tilefm.jobs.models import Job, JobSpec, JobState
from tilefm.jobs.service import JobService
from tilefm.jobs.store import JobStore
from tilefm.models import list_cards
from tilefm.settings import Settings, get_settings

log = logging.getLogger(__name__)


class JobIdConvertor(Convertor[str]):
    """Job ids in paths: only 32 hex characters match, so `/jobs/{id}:cancel` is its own route."""

    regex = "[0-9a-f]{32}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("jobid", JobIdConvertor())

JOB_ID = Path(
    description="Job id (32 hex characters)",
    pattern=r"^[0-9a-f]{32}$",
    examples=["0193a4c2f1e7aa0c4e1b2d3f4a5b6c7d"],
)

SPEC_EXAMPLES = {
    "cloud mask": {
        "summary": "Cloud mask of the sample scene to S3",
        "value": {
            "scene": {"s2": "../shared/data/s2-l2a-29RKH-20200219"},
            "model": "ukis-csmask",
            "zoom": 11,
            "output_prefix": "s3://tilefm/jobs/clouds/",
        },
    },
    "presto part": {
        "summary": "Presto embeddings for part of a scene given as a STAC item",
        "value": {
            "scene": {"s2": "../shared/data/s2-l2a-29RKH-20200219/stac-item.json"},
            "model": "presto",
            "zoom": 10,
            "bbox": [-11.6, 24.62, -11.2, 24.98],
            "output_prefix": "s3://tilefm/jobs/presto/",
            "priority": 7,
            "labels": {"project": "demo"},
        },
    },
    "presto time series": {
        "summary": (
            "Presto embeddings of a time series: several acquisitions of a modality, each with its own date"
        ),
        "value": {
            "scene": {
                "s2": [
                    "/data/s2/S2A_29RKH_20200105/stac-item.json",
                    "/data/s2/S2A_29RKH_20200219/stac-item.json",
                ]
            },
            "model": "presto",
            "zoom": 10,
            "bbox": [-11.6, 24.62, -11.2, 24.98],
            "output_prefix": "s3://tilefm/jobs/presto-series/",
        },
    },
}


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = None


class ModelInfo(BaseModel):
    name: str
    title: str
    architecture: str
    output: str
    inputs: list[str]
    backends: list[str]


def get_service(request: Request) -> JobService:
    service: JobService = request.app.state.service
    return service


def create_router() -> APIRouter:
    too_large: errors.Responses = {
        413: errors._doc("The request body is over the limit (TILEFM_API_MAX_BODY_BYTES)")
    }
    r = APIRouter(prefix="/v1", responses={**errors.RESPONSES, **too_large})
    not_found: errors.Responses = {404: errors._doc("No job with this id")}

    @r.post(
        "/jobs",
        status_code=202,
        response_model=Job,
        dependencies=[require(WRITE)],
        responses={
            200: {
                "description": "The job an identical earlier request with this Idempotency-Key created",
                "model": Job,
            },
            409: errors._doc("Idempotency-Key reused with a different body"),
        },
    )
    async def submit(
        request: Request,
        response: Response,
        spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", max_length=200, examples=["3f1c-upload-42"])
        ] = None,
    ) -> Job:
        """Validate a job against real files and settings, record it, and queue it."""
        job, created = await get_service(request).submit_async(
            spec, idempotency_key=idempotency_key, aredis=getattr(request.app.state, "aredis", None)
        )
        if not created:
            response.status_code = 200
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job

    @r.get("/jobs/{job_id:jobid}", response_model=Job, dependencies=[require(READ)], responses=not_found)
    def get(request: Request, job_id: Annotated[str, JOB_ID]) -> Job:
        return get_service(request).get(job_id)

    @r.get("/jobs", response_model=JobList, dependencies=[require(READ)])
    def list_jobs(
        request: Request,
        state: Annotated[JobState | None, Query(examples=["running"])] = None,
        limit: Annotated[int, Query(ge=1, le=100, examples=[20])] = 20,
        cursor: Annotated[str | None, Query(max_length=200, examples=[None])] = None,
    ) -> JobList:
        """Newest first; pass `next_cursor` back as `cursor` for the next page."""
        jobs, nxt = get_service(request).list(state=state, limit=limit, cursor=cursor)
        return JobList(jobs=jobs, next_cursor=nxt)

    def _cancel(request: Request, job_id: str) -> Job:
        return get_service(request).cancel(job_id)

    @r.post(
        "/jobs/{job_id:jobid}:cancel",
        response_model=Job,
        dependencies=[require(WRITE)],
        responses={**not_found, 409: errors._doc("The job already succeeded or failed")},
    )
    def cancel(request: Request, job_id: Annotated[str, JOB_ID]) -> Job:
        """Queued jobs are cancelled at once; running ones stop within seconds and their partial
        outputs are removed."""
        return _cancel(request, job_id)

    @r.delete(
        "/jobs/{job_id:jobid}",
        response_model=Job,
        dependencies=[require(WRITE)],
        responses={**not_found, 409: errors._doc("The job already succeeded or failed")},
    )
    def delete(request: Request, job_id: Annotated[str, JOB_ID]) -> Job:
        """Same as `:cancel`."""
        return _cancel(request, job_id)

    @r.get(
        "/jobs/{job_id:jobid}/events",
        dependencies=[require(READ)],
        response_class=StreamingResponse,
        responses={
            **not_found,
            200: {
                "content": {"text/event-stream": {}},
                "description": "JobEvent JSON per event until a final state",
            },
        },
    )
    async def events(request: Request, job_id: Annotated[str, JOB_ID]) -> StreamingResponse:
        service = get_service(request)
        service.get(job_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[Any] = asyncio.Queue()  # JobEvents, then `done`
            loop = asyncio.get_running_loop()
            stopped = threading.Event()
            done = object()

            def produce() -> None:  # the store read blocks: a thread, not the event loop
                try:
                    for ev in service.watch(job_id, poll_ms=1000, timeout_s=6 * 3600, stop=stopped.is_set):
                        loop.call_soon_threadsafe(queue.put_nowait, ev)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, done)

            loop.run_in_executor(None, produce)
            try:
                while (ev := await queue.get()) is not done:
                    yield f"event: {ev.state.value}\ndata: {ev.model_dump_json()}\n\n".encode()
            finally:
                stopped.set()  # the client left, or the job ended: the producer stops at its next poll

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @r.get("/models", response_model=list[ModelInfo])
    def models() -> list[ModelInfo]:
        return [
            ModelInfo(
                name=c.name,
                title=c.title,
                architecture=c.architecture,
                output=f"{c.output.kind}[{c.output.channels}]",
                inputs=[i.modality for i in c.inputs],
                backends=list(c.backends),
            )
            for c in list_cards()
        ]

    return r


def create_app(settings: Settings | None = None, *, store: JobStore | None = None) -> FastAPI:
    settings = settings or get_settings()
    own_store = store is None
    store = store or JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.api_threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        await anyio.to_thread.run_sync(app.state.service.warm)
        settle_heap()
        # submissions are recorded from the event loop through an asyncio client of the store's
        # Redis (made here: its connections belong to this loop); an injected store keeps threads
        app.state.aredis = (
            AsyncRedis.from_url(settings.redis_url, decode_responses=True) if own_store else None
        )
        try:
            yield
        finally:
            if app.state.aredis is not None:
                await app.state.aredis.aclose()

    app = FastAPI(
        title="tilefm jobs",
        lifespan=lifespan,
        version=__version__,
        description=(
            "Submit scene-level jobs that run a model over a scene and write a COG; follow them to "
            "completion."
        ),
    )
    app.state.settings = settings
    app.state.store = store
    app.state.service = JobService(store, settings)
    app.state.keyring = KeyRing(settings)
    errors.install(app)
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.include_router(create_router())
    collector = metrics.JobStoreCollector(store)

    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(HTTPMetrics)

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Redis, the object store and Ray (when an address is configured) are reachable, and
        with `require_durable_redis` Redis keeps an append-only file. `redis_persistence` says
        what that Redis keeps across a restart; `warnings` what readiness let pass."""
        checks = _readiness(settings, store)
        persistence, warnings = "unknown (unreachable)", []
        if checks["redis"] == "ok":
            persistence, failure, warning = _redis_durability(settings, store)
            if failure:
                checks["redis"] = failure
            warnings += [warning] if warning else []
        ok = all(v == "ok" for v in checks.values())
        body = {
            "status": "ok" if ok else "unavailable",
            "checks": checks,
            "redis_persistence": persistence,
            "warnings": warnings,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(extra=[collector]), media_type="text/plain; version=0.0.4")

    return app


def _redis_durability(settings: Settings, store: JobStore) -> tuple[str, str | None, str | None]:
    """(what Redis persists, a readiness failure, a warning). Without an append-only file a
    restart loses accepted jobs: a failure where `require_durable_redis` is set, a warning
    elsewhere; a Redis that does not say (INFO switched off) is only ever a warning."""
    try:
        p = store.persistence()
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"unknown ({type(e).__name__})", None, None
    if p.durable:
        return p.detail, None, None
    if p.durable is None:
        return (
            p.detail,
            None,
            "Redis does not say whether it persists: accepted jobs may be lost if it restarts",
        )
    if settings.require_durable_redis:
        return p.detail, f"not durable: {p.detail} (require_durable_redis is set)", None
    return (
        p.detail,
        None,
        (
            f"Redis keeps no append-only file ({p.detail}): accepted jobs are lost if it restarts; "
            "TILEFM_REQUIRE_DURABLE_REDIS=true makes this fail readiness"
        ),
    )


def _readiness(settings: Settings, store: JobStore) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        store.redis.ping()
        checks["redis"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        checks["redis"] = f"unreachable: {type(e).__name__}"
    try:
        from tilefm.storage import make_s3_client

        if settings.s3_endpoint_url:
            make_s3_client(settings).list_buckets()
        checks["object_store"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        checks["object_store"] = f"unreachable: {type(e).__name__}"
    if settings.ray_address and not settings.ray_address.startswith("local"):
        import socket

        host, _, port = settings.ray_address.replace("ray://", "").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=1).close()
            checks["ray"] = "ok"
        except (OSError, ValueError) as e:
            checks["ray"] = f"unreachable: {type(e).__name__}"
    else:
        checks["ray"] = "ok"  # the scheduler starts a local cluster
    return checks
