"""ASGI middleware the services share."""

from __future__ import annotations

import time

from tilefm import metrics


class HTTPMetrics:
    """Request counts and latency by route, as plain ASGI (starlette's BaseHTTPMiddleware costs
    a task and a queue per request, on the event loop every tile request goes through)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def _send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.http_seconds.labels(route, scope["method"]).observe(time.perf_counter() - t0)
            metrics.http_requests.labels(route, scope["method"], str(status["code"])).inc()
