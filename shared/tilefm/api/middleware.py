"""ASGI middleware and process set-up the services share."""

from __future__ import annotations

import gc
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tilefm import metrics


class HTTPMetrics:
    """Request counts and latency by route, as plain ASGI (starlette's BaseHTTPMiddleware costs
    a task and a queue per request, on the event loop every tile request goes through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.http_seconds.labels(route, scope["method"]).observe(time.perf_counter() - t0)
            metrics.http_requests.labels(route, scope["method"], str(status["code"])).inc()


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413 before the app sees it: at once by its
    Content-Length, otherwise (chunked, or a length that understates) by counting while it is
    buffered. Requests without a body pass straight through."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        if length is not None and not length.strip().isdigit():
            await _refuse(send, 400, "the Content-Length header is not a number")
            return
        if length is not None and int(length) > self.max_bytes:
            await self._too_large(send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: the app sees that as it would have
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _refuse(send, 413, f"the request body is over the limit of {self.max_bytes} bytes")


async def _refuse(send: Send, status: int, message: str) -> None:
    """An error response in the services' format (`tilefm.api.errors.error_body`), about the body."""
    body = json.dumps({"error": {"status": status, "field": "body", "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def settle_heap() -> None:
    """Move what start-up left alive (modules, model cards, warm caches) out of the cyclic
    collector's reach. Under load a full collection otherwise walks all of it every few seconds:
    55-75 ms pauses that were the job API's whole p99 (bench/submit.py: 86 ms -> 33 ms; the
    tiler's at 8 clients: 31-33 ms -> 21 ms, bench/tiler.py)."""
    gc.collect()
    gc.freeze()
