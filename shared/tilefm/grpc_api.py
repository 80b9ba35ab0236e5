"""The gRPC front end of the job service: `tilefm.v1.JobService` (protos/tilefm/v1/jobs.proto) over a
`tilefm.jobs.service.JobService`.

Thin, like the HTTP one: parse the request into the pydantic models, call the service, convert
back. Errors become status codes, never UNKNOWN for something the caller did:

| raised                                   | status              |
| ---------------------------------------- | ------------------- |
| JobNotFound                              | NOT_FOUND           |
| IdempotencyConflict                      | ALREADY_EXISTS      |
| InvalidTransition                        | FAILED_PRECONDITION |
| any other TileFMError, a bad request     | INVALID_ARGUMENT    |
| Redis unreachable                        | UNAVAILABLE         |
| anything else (a bug; logged)            | INTERNAL            |

The details are "field: message" when the error names a field (as `str(TileFMError)` reads); the
field alone also goes in the trailing metadata `tilefm-field`.

    server, port = create_server(JobService(store, settings), "0.0.0.0:50051")
    server.start()
    server.wait_for_termination()
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc
import pydantic
import redis

from tilefm.errors import TileFMError
from tilefm.jobs.errors import IdempotencyConflict, InvalidTransition, JobNotFound
from tilefm.jobs.proto import (
    event_to_proto,
    job_to_proto,
    pb,
    pb_grpc,
    spec_from_proto,
    state_from_proto,
)
from tilefm.jobs.service import JobService
from tilefm.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: ListJobsRequest.limit 0 means this
DEFAULT_LIST_LIMIT = 20
#: trailing metadata key carrying the field an INVALID_ARGUMENT (or other 4xx-like) error is about
FIELD_METADATA_KEY = "tilefm-field"


def status_for(exc: TileFMError) -> grpc.StatusCode:
    """The status code for a user-caused error."""
    if isinstance(exc, JobNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, IdempotencyConflict):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, InvalidTransition):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


#: the service's field names that read differently in the gRPC API
_FIELD_NAMES = {"Idempotency-Key": "idempotency_key"}


class _RequestError(TileFMError):
    """A bad request message; its text already names the field(s)."""

    def __init__(self, message: str, field: str | None):
        Exception.__init__(self, message)
        self.field = field

    def __str__(self) -> str:
        return Exception.__str__(self)


def _validation_error(exc: pydantic.ValidationError) -> _RequestError:
    """A pydantic error on a request as "field: message; ...", fields dotted the way the service
    names them ("zoom", "scene", "bbox"); the first field is the error's field."""
    parts, fields = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        fields.append(loc)
        parts.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", "")))
    return _RequestError("; ".join(parts) or str(exc), next((f for f in fields if f), None))


def _details(exc: TileFMError) -> tuple[str | None, str]:
    """(field, "field: message") for a TileFMError."""
    if isinstance(exc, _RequestError):
        return exc.field, str(exc)
    field = _FIELD_NAMES.get(exc.field, exc.field) if exc.field else None
    message = Exception.__str__(exc)
    return field, f"{field}: {message}" if field else message


def _abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    if isinstance(exc, pydantic.ValidationError):
        exc = _validation_error(exc)
    if isinstance(exc, TileFMError):
        field, details = _details(exc)
        if field and field.isascii() and field.isprintable():
            context.set_trailing_metadata(((FIELD_METADATA_KEY, field),))
        context.abort(status_for(exc), details)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        log.warning("job store unavailable: %s", exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the job store is unavailable: {exc}")
    log.error("internal error in the gRPC job API", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server's log")


def _required(value: str, field: str) -> str:
    if not value:
        raise TileFMError("required", field=field)
    return value


class JobServicer(pb_grpc.JobServiceServicer):
    """`tilefm.v1.JobService` over a JobService."""

    def __init__(self, service: JobService, *, watch_poll_ms: int = 1000):
        self.service = service
        self.watch_poll_ms = watch_poll_ms

    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.SubmitResponse:  # noqa: N802
        try:
            if not request.HasField("spec"):
                raise TileFMError("required", field="spec")
            spec = spec_from_proto(request.spec)
            job, created = self.service.submit(spec, idempotency_key=request.idempotency_key or None)
            return pb.SubmitResponse(job=job_to_proto(job), created=created)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    def Get(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:  # noqa: N802
        try:
            return job_to_proto(self.service.get(_required(request.id, "id")))
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    def List(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:  # noqa: N802
        try:
            try:
                state = state_from_proto(request.state)
            except ValueError as e:
                raise TileFMError(str(e), field="state") from None
            jobs, cursor = self.service.list(
                state=state, limit=request.limit or DEFAULT_LIST_LIMIT, cursor=request.cursor or None
            )
            return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_cursor=cursor or "")
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    def Cancel(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:  # noqa: N802
        try:
            return job_to_proto(self.service.cancel(_required(request.id, "id")))
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    def Watch(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:  # noqa: N802
        # the stop check runs at every store poll, so an abandoned Watch frees its thread within
        # one poll even while its job is quiet
        stop = lambda: not context.is_active()  # noqa: E731
        try:
            for event in self.service.watch(_required(request.id, "id"), poll_ms=self.watch_poll_ms, stop=stop):
                if stop():
                    return
                yield event_to_proto(event)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)


def create_server(
    service: JobService,
    address: str = "127.0.0.1:0",
    *,
    max_workers: int = 32,
    watch_poll_ms: int = 1000,
    options: list[tuple[str, Any]] | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server serving `JobServicer(service)` on `address` (insecure; TLS belongs to the
    ingress), not started yet: call `.start()`. Returns it and the bound port (the one picked for
    port 0). Every open Watch holds one of `max_workers` threads."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options or [])
    pb_grpc.add_JobServiceServicer_to_server(JobServicer(service, watch_poll_ms=watch_poll_ms), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def serve_background(address: str, settings: Settings | None = None) -> grpc.Server:
    """Start the gRPC JobService beside the HTTP API (same settings, same job store)."""
    from tilefm.jobs.store import JobStore

    settings = settings or get_settings()
    store = JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    server, port = create_server(JobService(store, settings), address)
    server.start()
    log.info("gRPC JobService on %s (port %d)", address, port)
    return server
