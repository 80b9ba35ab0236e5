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
field alone also goes in the trailing metadata `tilefm-field`. A request that is not a valid message
(bytes that do not parse) is INVALID_ARGUMENT about the field `request`.

Every call is authenticated with the HTTP API's keys and scopes (`tilefm.api.grpc_auth`):
UNAUTHENTICATED without a known key, PERMISSION_DENIED without the method's scope.

    server, port = create_server(JobService(store, settings), "0.0.0.0:50051")
    server.start()
    server.wait_for_termination()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc
import pydantic
import redis

from tilefm.api.auth import KeyRing
from tilefm.api.grpc_auth import AuthInterceptor, method_handler_like
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
#: longest job id, cursor or idempotency key taken (the HTTP API's limits); longer ones are refused
#: before they reach the store or are echoed back in an error
MAX_TOKEN_CHARS = 200
#: error details are cut to this many characters: they travel in a header, and a client refuses
#: trailing metadata over its limit (8 KiB by default) with an error of its own
MAX_DETAILS_CHARS = 1000
#: seconds `stop_server` lets calls in flight finish (open Watch streams are then cancelled)
STOP_GRACE_S = 5.0


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


def _metadata_field(field: str | None) -> str | None:
    """`field` as a metadata value (printable ASCII): a field under a map key that is not, e.g.
    "labels.<non-ASCII key>", is named by its top-level field."""
    for name in (field, (field or "").split(".")[0]):
        if name and name.isascii() and name.isprintable():
            return name
    return None


def _cut(details: str) -> str:
    return details if len(details) <= MAX_DETAILS_CHARS else details[: MAX_DETAILS_CHARS - 1] + "…"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    if isinstance(exc, pydantic.ValidationError):
        exc = _validation_error(exc)
    if isinstance(exc, TileFMError):
        field, details = _details(exc)
        if (name := _metadata_field(field)) is not None:
            context.set_trailing_metadata(((FIELD_METADATA_KEY, name),))
        context.abort(status_for(exc), _cut(details))
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        log.warning("job store unavailable: %s", exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the job store is unavailable: {exc}")
    log.error("internal error in the gRPC job API", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server's log")


def _required(value: str, field: str) -> str:
    if not value:
        raise TileFMError("required", field=field)
    return _bounded(value, field)


def _bounded(value: str, field: str) -> str:
    if len(value) > MAX_TOKEN_CHARS:
        raise TileFMError(f"{len(value)} characters, over the limit of {MAX_TOKEN_CHARS}", field=field)
    return value


class JobServicer(pb_grpc.JobServiceServicer):
    """`tilefm.v1.JobService` over a JobService."""

    def __init__(self, service: JobService, *, watch_poll_ms: int = 1000):
        self.service = service
        self.watch_poll_ms = watch_poll_ms

    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.SubmitResponse:
        try:
            if not request.HasField("spec"):
                raise TileFMError("required", field="spec")
            spec = spec_from_proto(request.spec)
            key = _bounded(request.idempotency_key, "idempotency_key") or None
            job, created = self.service.submit(spec, idempotency_key=key)
            return pb.SubmitResponse(job=job_to_proto(job), created=created)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    def Get(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        try:
            return job_to_proto(self.service.get(_required(request.id, "id")))
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    def List(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        try:
            try:
                state = state_from_proto(request.state)
            except ValueError as e:
                raise TileFMError(str(e), field="state") from None
            jobs, cursor = self.service.list(
                state=state,
                limit=request.limit or DEFAULT_LIST_LIMIT,
                cursor=_bounded(request.cursor, "cursor") or None,
            )
            return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_cursor=cursor or "")
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    def Cancel(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        try:
            return job_to_proto(self.service.cancel(_required(request.id, "id")))
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)

    def Watch(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        # the stop check runs at every store poll, so an abandoned Watch frees its thread within
        # one poll even while its job is quiet
        def stop() -> bool:
            return not context.is_active()

        try:
            for event in self.service.watch(
                _required(request.id, "id"), poll_ms=self.watch_poll_ms, stop=stop
            ):
                if stop():
                    return
                yield event_to_proto(event)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            _abort(context, exc)


class _Malformed:
    """A request whose bytes did not parse; the servicer never sees it."""

    def __init__(self, error: str):
        self.error = error


class _MalformedRequests(grpc.ServerInterceptor):
    """Bytes that are not a valid request message become INVALID_ARGUMENT about `request` (gRPC's
    own answer is INTERNAL, "Exception deserializing request!", with a stack trace in the log)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if behavior is None:  # set for every unary-request handler; typed as optional
            return handler

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or what a parser raises
                return _Malformed(str(e) or type(e).__name__)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                _abort(
                    context,
                    _RequestError(
                        f"request: not a valid {handler_call_details.method} message ({request.error})",
                        "request",
                    ),
                )
            return behavior(request, context)

        return method_handler_like(handler, guarded, request_deserializer=lenient)


def create_server(
    service: JobService,
    address: str = "127.0.0.1:0",
    *,
    keyring: KeyRing | None = None,
    max_workers: int = 32,
    watch_poll_ms: int = 1000,
    options: list[tuple[str, Any]] | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server serving `JobServicer(service)` on `address` (insecure; TLS belongs to the
    ingress), not started yet: call `.start()`.

    Args:
        service: the job service the calls go to.
        address: host:port to listen on (port 0: any free one).
        keyring: the API keys calls must present; default `KeyRing(service.settings)`, the keys
            and `auth_disabled` of the HTTP API.
        max_workers: threads serving calls; every open Watch holds one.
        watch_poll_ms: how often a Watch checks that its caller is still there.
        options: gRPC channel arguments, over these defaults: messages up to
            `settings.api_max_body_bytes`, and no SO_REUSEPORT (a second server on the port fails
            instead of silently sharing it).

    Returns:
        The server and the bound port (the one picked for port 0).

    Raises:
        OSError: nothing can listen on `address`.
    """
    limit = service.settings.api_max_body_bytes
    defaults = {"grpc.so_reuseport": 0, "grpc.max_receive_message_length": limit}
    merged = {**defaults, **dict(options or [])}
    interceptors = [AuthInterceptor(keyring or KeyRing(service.settings)), _MalformedRequests()]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=interceptors,
        options=list(merged.items()),
    )
    servicer = JobServicer(service, watch_poll_ms=watch_poll_ms)
    # the generated module carries no annotations
    pb_grpc.add_JobServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio's "Failed to bind to address" (e.g. the port is taken)
        raise OSError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def serve_background(address: str, settings: Settings | None = None) -> grpc.Server:
    """Start the gRPC JobService beside the HTTP API (same settings, same job store, same keys).

    The caller owns the returned server: keep a reference for as long as it should serve (a
    server nothing refers to is garbage-collected, and stops listening) and end it with
    `stop_server`.

    Args:
        address: host:port to listen on.
        settings: default `get_settings()`.

    Returns:
        The started server.

    Raises:
        OSError: nothing can listen on `address` (e.g. another process has the port).
    """
    from tilefm.jobs.store import JobStore

    settings = settings or get_settings()
    store = JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    service = JobService(store, settings)
    service.warm()
    server, port = create_server(service, address)
    server.start()
    log.info("gRPC JobService on %s (port %d)", address, port)
    return server


def stop_server(server: grpc.Server, grace_s: float = STOP_GRACE_S) -> None:
    """Stop taking calls, let those in flight finish for up to `grace_s`, cancel the rest, and
    return once the server is down."""
    server.stop(grace_s).wait()
    log.info("gRPC JobService stopped")
