"""Durability of the job store: Redis killed and restarted from its append-only file while a job
runs (an integration test: its own redis-server, the scheduler and the job API as processes, a
real S3 server and model), and the API's answers while Redis is away."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import start_scheduler, stop_process
from fastapi.testclient import TestClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from tilefm.api.jobs import create_app
from tilefm.jobs.store import JobStore
from tilefm.localstack import redis_command
from tilefm.settings import Settings
from tilefm.storage import storage_for

#: 12 z11 tiles: long enough to restart Redis in the middle of, short enough for 2 cores
BBOX = [-11.7, 24.6, -11.2, 24.95]
TILES = 12
#: how long Redis stays away: past the API client's own retries, so that requests get 503s
DOWN_S = 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1 with every write fsynced to its AOF before the reply, so that a
    SIGKILL loses nothing that was acknowledged."""

    def __init__(self, data: Path, log: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is needed (apt-get install redis-server)")
        self.exe, self.data, self.log, self.port = exe, data, log, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        data.mkdir(mode=0o700, parents=True, exist_ok=True)

    def start(self) -> None:
        cmd = redis_command(self.exe, self.port, self.data, fsync="always")
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.log, "ab"),  # noqa: SIM115 - the server writes to it for its whole life
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:  # not listening yet, or still loading the AOF
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", tmp_path / "redis.log")
    server.start()
    yield server
    server.kill()


def _start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "tilefm",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        "0",
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=open(log, "ab"),  # noqa: SIM115 - the server writes to it for its whole life
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_process(proc)
    raise AssertionError(f"the API did not start:\n{log.read_text()[-2000:]}")


@pytest.mark.integration
def test_job_survives_redis_restart(
    redis_server: RedisServer, s3_settings: Settings, shared_dir: Path, scene_dir: Path, tmp_path: Path
) -> None:
    """Redis is SIGKILLed while a job runs and restarted from its AOF: the API answers 503 (never
    500) meanwhile and 200 after, the scheduler waits for Redis and carries on, and the job
    finishes with every tile recorded once and planned once."""
    env = {
        "TILEFM_REDIS_URL": redis_server.url,
        "TILEFM_REQUIRE_DURABLE_REDIS": "true",
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(shared_dir / "data")]),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps(["s3://tilefm/"]),
        "TILEFM_AUTH_DISABLED": "true",
    }
    sched_log, api_log = tmp_path / "scheduler.log", tmp_path / "api.log"
    scheduler = start_scheduler(env, sched_log)
    port = _free_port()
    api = _start_api(env, port, api_log)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        ready = http.get("/readyz").json()
        assert ready["status"] == "ok" and ready["redis_persistence"] == "aof (appendfsync always)", ready
        spec = {
            "scene": {"s2": str(scene_dir)},
            "model": "ukis-csmask",
            "zoom": 11,
            "bbox": BBOX,
            "output_prefix": f"s3://tilefm/restart/{tmp_path.name}/",
        }
        r = http.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["progress"]["tiles_total"] == TILES

        deadline = time.monotonic() + 240  # a cold local Ray cluster and the model load come first
        while (job := http.get(f"/v1/jobs/{job_id}").json())["progress"]["tiles_done"] < 1:
            assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.2)
        redis_server.kill()
        killed = time.monotonic()
        statuses = [http.post("/v1/jobs", json=spec).status_code]  # recording a job needs Redis
        while time.monotonic() - killed < DOWN_S:
            statuses.append(http.get(f"/v1/jobs/{job_id}").status_code)
        statuses.append(http.get("/readyz").status_code)
        redis_server.start()
        assert set(statuses) <= {503} and statuses[0] == 503, statuses
        while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline + 120, job
            time.sleep(0.5)

        assert job["state"] == "succeeded", (job, sched_log.read_text()[-3000:])
        assert job["progress"] == {"tiles_total": TILES, "tiles_done": TILES, "tiles_failed": 0}
        assert scheduler.poll() is None and api.poll() is None
        assert http.get("/readyz").status_code == 200
        log = sched_log.read_text()
        assert "redis unreachable" in log and "redis reachable again" in log, log[-3000:]
        # planned once (no re-queue, so no tile ran twice) and recorded once each
        store = JobStore.from_url(redis_server.url)
        starts = [
            e.message
            for _, e in store.events(job_id, "0", block_ms=0, count=1000)
            if e.message.startswith("running:")
        ]
        assert starts == [f"running: {TILES} of {TILES} tiles to do"], starts
        assert len(store.tiles_done(job_id)) == TILES
        # only the accepted job: the submission during the outage left nothing behind
        assert [j.id for j in store.list(limit=10)[0]] == [job_id]
        cog = job["outputs"][0]
        assert storage_for(cog, s3_settings).exists(cog)
        prefix = cog.split("s3://tilefm/", 1)[1].rsplit("/", 1)[0] + "/"
        keys = [
            o["Key"]
            for o in storage_for(cog, s3_settings)
            .client.list_objects_v2(Bucket="tilefm", Prefix=prefix)
            .get("Contents", [])
        ]
        assert not [k for k in keys if "/.parts-" in k], keys
    finally:
        http.close()
        stop_process(api)
        stop_process(scheduler)


def test_api_answers_503_while_redis_is_unreachable() -> None:
    """Every route that needs the store answers 503 with Retry-After, not 500, and /readyz says why."""
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    store = JobStore.from_url(dead, retry=Retry(NoBackoff(), 0))
    client = TestClient(create_app(Settings(redis_url=dead, auth_disabled=True), store=store))
    for method, path in (
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{'0' * 32}"),
        ("POST", f"/v1/jobs/{'0' * 32}:cancel"),
    ):
        r = client.request(method, path)
        assert r.status_code == 503 and r.headers["Retry-After"], (path, r.text)
        assert "job store" in r.json()["error"]["message"]
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["redis"].startswith("unreachable")


def test_readiness_names_redis_persistence() -> None:
    """The machine's Redis keeps no AOF: a warning by default, a failed readiness where durability
    is required."""
    store = JobStore.from_url("redis://127.0.0.1:6379/0")
    if store.persistence().durable is not False:
        pytest.skip("the machine's Redis persists (or does not say): nothing to warn about")
    lenient = TestClient(create_app(Settings(), store=store)).get("/readyz")
    assert lenient.status_code == 200 and lenient.json()["checks"]["redis"] == "ok"
    assert "append-only" in lenient.json()["warnings"][0] and lenient.json()["redis_persistence"]
    strict = TestClient(create_app(Settings(require_durable_redis=True), store=store)).get("/readyz")
    assert strict.status_code == 503 and strict.json()["checks"]["redis"].startswith("not durable")
