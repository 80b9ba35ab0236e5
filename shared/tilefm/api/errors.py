"""Errors as JSON with the field and the problem, never a bare 500 for something the user did."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tilefm.errors import TileFMError
from tilefm.jobs.errors import IdempotencyConflict, InvalidTransition, JobNotFound
from tilefm.jobs.store import REDIS_UNAVAILABLE
from tilefm.tiler.errors import JobNotFinished, OutputUnreadable, PathNotAllowed, TileNotAvailable

log = logging.getLogger(__name__)

STATUS = {
    JobNotFound: 404,
    IdempotencyConflict: 409,
    InvalidTransition: 409,
    JobNotFinished: 409,
    OutputUnreadable: 404,
    TileNotAvailable: 404,
    PathNotAllowed: 403,
}


class ErrorDetail(BaseModel):
    field: str | None = None
    message: str | None = None


class Error(BaseModel):
    status: int
    field: str | None = None
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    """Every error: the HTTP status, the field it is about (when there is one) and what is wrong."""

    error: Error


#: OpenAPI response documentation by status code, as FastAPI's `responses=` takes it
Responses = dict[int | str, dict[str, Any]]


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


#: documented on every route
RESPONSES: Responses = {
    400: _doc("Malformed request (e.g. the body is not JSON)"),
    401: _doc("No API key, or an unknown one"),
    403: _doc("The API key lacks the scope this route needs"),
    405: _doc("Method not allowed on this path"),
    422: _doc("A field has a wrong type or value, or names something that cannot be used"),
    503: _doc("The job store (Redis) cannot be reached for now; retry after the Retry-After seconds"),
}

#: seconds a client is asked to wait while Redis is unreachable (a restart replaying its AOF
#: takes about this long)
REDIS_RETRY_AFTER_S = 5


def _text(value: str | None) -> str | None:
    """`value` safe to encode as UTF-8: a lone surrogate (possible in a JSON key or string the
    request sent) is escaped instead of failing the response."""
    return value.encode("utf-8", "backslashreplace").decode() if value is not None else None


def error_body(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"status": status, "field": _text(field), "message": _text(message)}}


def allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            for m in ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"):
                if route.matches({**request.scope, "method": m})[0] == Match.FULL:
                    methods.add(m)
    return methods


def install(app: FastAPI) -> None:
    @app.exception_handler(TileFMError)
    async def _tilefm(_: Request, exc: TileFMError) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 422)
        message = super(TileFMError, exc).__str__()
        return JSONResponse(error_body(status, message, exc.field), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", []) if p not in ("body",)]
        # an error about the body as a whole (missing, not an object) is about "body"
        field = ".".join(loc) or ".".join(str(p) for p in first.get("loc", [])) or None
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body(400, f"malformed JSON: {first.get('msg')}", "body"), status_code=400
            )
        details = [
            {
                "field": _text(".".join(str(p) for p in e.get("loc", []) if p != "body")),
                "message": _text(e.get("msg")),
            }
            for e in errors
        ]
        body = error_body(422, f"{field}: {first.get('msg')}" if field else str(first.get("msg")), field)
        body["error"]["details"] = details
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of every route on this path, not just the first route's
            headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        # FastAPI's 400 for a body its parser gave up on (e.g. JSON nested past the recursion
        # limit) chains the parser's error
        field = "body" if exc.status_code == 400 and exc.__cause__ is not None else None
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), field),
            status_code=exc.status_code,
            headers=headers or None,
        )

    async def _redis_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unreachable: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            error_body(503, "the job store is unreachable for now; retry shortly"),
            status_code=503,
            headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        )

    for cls in REDIS_UNAVAILABLE:  # a restarting Redis is not a bug: the client retries, the process stays up
        app.add_exception_handler(cls, _redis_unavailable)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "internal error"), status_code=500)
