"""Errors as JSON with the field and the problem, never a bare 500 for something the user did."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tilefm.errors import TileFMError
from tilefm.jobs.errors import IdempotencyConflict, InvalidTransition, JobNotFound

log = logging.getLogger(__name__)

STATUS = {JobNotFound: 404, IdempotencyConflict: 409, InvalidTransition: 409}


def error_body(status: int, message: str, field: str | None = None) -> dict:
    return {"error": {"status": status, "field": field, "message": message}}


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
        field = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"malformed JSON: {first.get('msg')}", "body"), status_code=400)
        details = [{"field": ".".join(str(p) for p in e.get("loc", []) if p != "body"), "message": e.get("msg")} for e in errors]
        body = error_body(422, f"{field}: {first.get('msg')}" if field else str(first.get("msg")), field)
        body["error"]["details"] = details
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "internal error"), status_code=500)
