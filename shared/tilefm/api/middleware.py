"""ASGI middleware and process set-up the services share."""

from __future__ import annotations

import gc
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


def settle_heap() -> None:
    """Move what start-up left alive (modules, model cards, warm caches) out of the cyclic
    collector's reach. Under load a full collection otherwise walks all of it every few seconds:
    55-75 ms pauses that were the job API's whole p99 (bench/submit.py: 86 ms -> 33 ms; the
    tiler's at 8 clients: 31-33 ms -> 21 ms, bench/tiler.py)."""
    gc.collect()
    gc.freeze()
