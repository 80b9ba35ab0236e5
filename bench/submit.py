"""Job API benchmark: submit latency under concurrency, and jobs/min for small jobs.

    .venv/bin/python bench/submit.py [--clients 50] [--seconds 10] [--rounds 3] [--small-jobs 20]

Everything real and local: Redis at 127.0.0.1:6379 (a private key prefix), a SeaweedFS S3 server,
the API under uvicorn (2 worker processes), and for jobs/min a scheduler on a local Ray cluster.
The load comes from wrk (Debian package; `--generator python` for asyncio clients): the workers
are warmed by `--clients` concurrent clients, then `--rounds` rounds of `--seconds` each.
Each submission is a distinct job (its own bbox inside the sample scene, its own
Idempotency-Key), validated against the real files before the 202, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from tilefm.api.auth import hash_key
from tilefm.jobs.store import JobStore
from tilefm.localstack import S3Server

SHARED = Path(__file__).resolve().parents[2] / "shared"
SCENE = SHARED / "data" / "s2-l2a-29RKH-20200219"
KEY = "bench-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(rng: random.Random, prefix: str, size: float = 0.05) -> dict:
    lon = rng.uniform(-11.8, -11.1)
    lat = rng.uniform(24.45, 25.1)
    return {
        "scene": {"s2": str(SCENE)},
        "model": "ukis-csmask",
        "zoom": 11,
        "bbox": [lon, lat, lon + size, lat + size],
        "output_prefix": prefix,
    }


async def client(
    http: httpx.AsyncClient,
    n: int,
    rng: random.Random,
    prefix: str,
    latencies: list[float],
    errors: list[str],
) -> None:
    for _ in range(n):
        body = spec(rng, prefix)
        t0 = time.perf_counter()
        r = await http.post("/v1/jobs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        latencies.append(time.perf_counter() - t0)
        if r.status_code != 202:
            errors.append(f"{r.status_code} {r.text[:200]}")


async def submit_load(base: str, clients: int, per_client: int, prefix: str) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers={"X-API-Key": KEY}, limits=limits, timeout=30
    ) as http:
        warm = random.Random(0)
        for _ in range(20):  # warm every worker process's caches (the scene, the output probe)
            await http.post("/v1/jobs", json=spec(warm, prefix))
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                client(http, per_client, random.Random(i + 1), prefix, latencies, errors)
                for i in range(clients)
            )
        )
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": round(q[49] * 1000, 1),
        "p90_ms": round(q[89] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "submissions_per_s": round(len(latencies) / wall, 1),
    }


WRK_LUA = """
local prefix = "%s"
local scene = "%s"
local n = 0
math.randomseed(%d)
request = function()
  n = n + 1
  local lon = -11.8 + math.random() * 0.7
  local lat = 24.45 + math.random() * 0.65
  local body = string.format('{"scene":{"s2":"%%s"},"model":"ukis-csmask","zoom":11,'
    .. '"bbox":[%%.6f,%%.6f,%%.6f,%%.6f],"output_prefix":"%%s"}',
    scene, lon, lat, lon + 0.05, lat + 0.05, prefix)
  local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = "%s",
                   ["Idempotency-Key"] = string.format("%%d-%%d-%%d", %d, n, math.random(1, 1e9))}
  return wrk.format("POST", "/v1/jobs", headers, body)
end
"""


def submit_load_wrk(base: str, clients: int, seconds: int, prefix: str, work: Path) -> dict:
    """The same submissions from wrk (C, event loop): the load generator takes a few % of a core
    instead of the ~1 ms of CPU per request an asyncio Python client spends."""
    import re

    asyncio.run(
        submit_load(base, clients, 2, prefix)
    )  # warm every worker's caches first (many connections reach them all)
    script = work / "submit.lua"
    script.write_text(WRK_LUA % (prefix, SCENE, 7, KEY, 7))
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(clients),
            "-d",
            f"{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
        return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit], 1)

    pct = {m.group(1): ms(m.group(2)) for m in re.finditer(r"^\s+(50|90|99)(?:\.0+)?%\s+(\S+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "generator": "wrk",
        "clients": clients,
        "requests": total,
        "errors": int(errors.group(1)) if errors else 0,
        "p50_ms": pct["50"],
        "p90_ms": pct["90"],
        "p99_ms": pct["99"],
        "max_ms": ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1)),
        "submissions_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
    }


def jobs_per_minute(base: str, n: int, prefix: str) -> dict:
    http = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30)
    rng = random.Random(42)
    t0 = time.perf_counter()
    ids = [http.post("/v1/jobs", json=spec(rng, prefix, size=0.02)).json()["id"] for _ in range(n)]
    tiles = 0
    while True:
        jobs = [http.get(f"/v1/jobs/{i}").json() for i in ids]
        if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    tiles = sum(j["progress"]["tiles_total"] for j in jobs)
    return {
        "jobs": n,
        "succeeded": sum(j["state"] == "succeeded" for j in jobs),
        "tiles": tiles,
        "seconds": round(wall, 1),
        "jobs_per_min": round(n / wall * 60, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--per-client", type=int, default=10)
    p.add_argument("--small-jobs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--generator",
        choices=["wrk", "python"],
        default="wrk",
        help="load generator: wrk (Debian package; default) or the asyncio httpx client",
    )
    p.add_argument("--seconds", type=int, default=10, help="wrk: how long to submit")
    p.add_argument(
        "--rounds", type=int, default=3, help="wrk: rounds on the same server; the last is reported"
    )
    p.add_argument("--skip-small-jobs", action="store_true")
    args = p.parse_args()

    redis_prefix = f"tilefm-bench-{uuid.uuid4().hex[:8]}:"
    procs: list[subprocess.Popen] = []
    with S3Server(bucket="tilefm") as s3:
        env = {
            **os.environ,
            **s3.tilefm_env(),
            "TILEFM_REDIS_PREFIX": redis_prefix,
            "TILEFM_MODEL_STORE": str(SHARED / "models"),
            "TILEFM_API_KEYS": json.dumps([{"name": "bench", "sha256": hash_key(KEY)}]),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        try:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "tilefm.api.jobs:create_app",
                        "--factory",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--workers",
                        str(args.workers),
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                    start_new_session=True,
                )
            )
            for _ in range(150):
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            if args.generator == "wrk":
                import tempfile

                rounds = [
                    submit_load_wrk(
                        base,
                        args.clients,
                        args.seconds,
                        "s3://tilefm/bench-submit/",
                        Path(tempfile.mkdtemp()),
                    )
                    for _ in range(args.rounds)
                ]
                for i, r in enumerate(rounds[:-1]):
                    print(json.dumps({"submit_round": i + 1, **r}), flush=True)
                load = rounds[-1]
            else:
                load = asyncio.run(
                    submit_load(base, args.clients, args.per_client, "s3://tilefm/bench-submit/")
                )
            print(json.dumps({"submit": load}), flush=True)
            if args.skip_small_jobs:
                return 0
            # drop the queued load-test jobs, then measure throughput with a scheduler
            store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=redis_prefix)
            store.redis.delete(*store.redis.keys(f"{redis_prefix}*"))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tilefm", "scheduler", "--metrics-port", "0"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            time.sleep(8)  # Ray start-up is not part of a job's time
            rate = jobs_per_minute(base, args.small_jobs, "s3://tilefm/bench-small/")
            print(json.dumps({"small_jobs": rate}), flush=True)
            summary = {
                "submit": load,
                "small_jobs": rate,
                "cpus": len(os.sched_getaffinity(0)),
                "api_workers": args.workers,
            }
            print(json.dumps(summary, indent=2))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
            keys = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=redis_prefix).redis.keys(
                f"{redis_prefix}*"
            )
            if keys:
                JobStore.from_url("redis://127.0.0.1:6379/0").redis.delete(*keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
