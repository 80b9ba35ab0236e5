"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tilefm.localstack import S3Server
from tilefm.settings import Settings, get_settings

# ------------------------------------------------------------------------------------------------
# Tiers: `make test-fast` runs `-m "not integration and not slow and not gpu"`, `make test` all.
# Modules whose every test starts servers or clusters say so with `pytestmark`; tests elsewhere
# that use one of the fixtures below are marked here, so that a new test gets its tier from what
# it uses.
# ------------------------------------------------------------------------------------------------

#: fixtures that start servers or processes of their own (direct or through other fixtures)
INTEGRATION_FIXTURES = {
    "s3_server",  # a SeaweedFS S3 server (s3_settings, tiler_env and their users)
    "finished_jobs",  # the scheduler on a local Ray cluster, running two jobs
    "tiler_server",  # the tile server over HTTP
    "helm",  # helm lint/template of the chart (tests/test_deploy.py)
}
#: fixtures that run a whole scene through a model
SLOW_FIXTURES = {"whole_scene_clouds"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & INTEGRATION_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder beside the repository (test data, reference outputs, tools)."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        raise FileNotFoundError(f"the shared folder {path} is missing; the tests need it")
    return path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session, with the bucket `tilefm`."""
    with S3Server(bucket="tilefm") as server:
        yield server


@pytest.fixture(scope="session")
def s3_settings(s3_server: S3Server) -> Iterator[Settings]:
    """tilefm Settings pointed at `s3_server`; the TILEFM_S3_* env vars are set too (for
    subprocesses and `get_settings()`) and restored after the session."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.tilefm_env().items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        yield Settings()
        get_settings.cache_clear()


REPO = Path(__file__).resolve().parents[1]
#: artefacts tests keep (screenshots, sample outputs): under the repo, ignored by git
OUTPUT_DIR = REPO / "test-output"


@pytest.fixture(scope="session", autouse=True)
def model_store(shared_dir: Path) -> Iterator[Path]:
    """Every test (and every `tilefm` subprocess) reads weights from ../shared/models."""
    store = shared_dir / "models"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEFM_MODEL_STORE", str(store))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        get_settings.cache_clear()
        yield store
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def scene_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "s2-l2a-29RKH-20200219"


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the `tilefm` command as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tilefm", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


# ------------------------------------------------------------------------------------------------
# Finished jobs for the tile server's tests: real scheduler, real Ray, real S3, real models
# ------------------------------------------------------------------------------------------------

TILER_PREFIX = "s3://tilefm/tiler-test/"
PRESTO_BBOX = [-11.5, 24.7, -11.3, 24.85]  # 2 z10 tiles in the middle of the scene
CLOUDS_BBOX = [-11.7, 24.6, -11.2, 24.95]  # 4 x 3 z11 tiles: inner tile edges, a cloud field


def settings_from(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def drop_redis_keys(prefix: str) -> None:
    """Remove a test deployment's keys from the machine's Redis."""
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def start_scheduler(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`tilefm scheduler` in its own process group, on a local Ray cluster, logging to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "tilefm", "scheduler", "--metrics-port", "0"],
        env={**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen, sig: int | None = None) -> None:
    """Signal the process group (SIGTERM by default); SIGKILL it if it has not gone in 30 s."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, sig or signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def tiler_env(s3_settings: Settings, shared_dir: Path) -> Iterator[dict[str, str]]:
    """TILEFM_* settings of a deployment with its own Redis key prefix (removed afterwards)."""
    import json
    import uuid

    prefix = f"tilefm-tiler-test-{uuid.uuid4().hex[:8]}:"
    env = {
        **{k: v for k, v in os.environ.items() if k.startswith("TILEFM_")},
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(shared_dir / "data")]),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps([TILER_PREFIX]),
        "TILEFM_AUTH_DISABLED": "true",
    }
    yield env
    drop_redis_keys(prefix)


@pytest.fixture(scope="session")
def finished_jobs(tiler_env: dict[str, str], scene_dir: Path, tmp_path_factory) -> dict[str, str]:
    """Two succeeded jobs, run by a real scheduler: the cloud mask (z11, 12 tiles) and Presto
    embeddings (z10, 2 tiles) of part of the sample scene. {"clouds": id, "presto": id}."""
    import time

    from tilefm.jobs.models import JobSpec, JobState
    from tilefm.jobs.service import JobService
    from tilefm.jobs.store import JobStore

    settings = settings_from(tiler_env)
    store = JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    service = JobService(store, settings)
    log = tmp_path_factory.mktemp("tiler-sched") / "scheduler.log"
    proc = start_scheduler(tiler_env, log)
    try:
        specs = {
            "clouds": JobSpec(
                scene={"s2": str(scene_dir)},
                model="ukis-csmask",
                zoom=11,
                bbox=tuple(CLOUDS_BBOX),
                output_prefix=TILER_PREFIX,
            ),
            "presto": JobSpec(
                scene={"s2": str(scene_dir)},
                model="presto",
                zoom=10,
                bbox=tuple(PRESTO_BBOX),
                output_prefix=TILER_PREFIX,
            ),
        }
        ids = {name: service.submit(spec)[0].id for name, spec in specs.items()}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            jobs = {name: store.get(i) for name, i in ids.items()}
            if all(j.state.final for j in jobs.values()):
                break
            time.sleep(1)
        bad = {n: (j.state.value, j.error) for n, j in jobs.items() if j.state != JobState.SUCCEEDED}
        assert not bad, f"jobs did not succeed: {bad}; scheduler log:\n{log.read_text()[-3000:]}"
        return ids
    finally:
        stop_process(proc)


@dataclass
class WholeSceneRun:
    """The cloud model over the whole sample scene, as the job API saw it and as it was written."""

    #: the answer to the POST: status, its Location header, the job it returned
    status_code: int
    location: str
    submitted: dict
    #: the events streamed from /v1/jobs/{id}/events while the job ran, and the job once finished
    events: list[dict]
    job: dict
    #: the job's parts left on S3 once they had their time to go (30 s after the job succeeded)
    parts_left: int
    #: the output COG and its STAC item, on S3 and fetched to a local folder
    cog_uri: str
    stac_uri: str
    cog: Path
    stac: Path


@pytest.fixture(scope="session")
def whole_scene_clouds(
    tiler_env: dict[str, str], s3_settings: Settings, scene_dir: Path, tmp_path_factory
) -> Iterator[WholeSceneRun]:
    """The cloud mask of the whole sample scene (zoom 11, 56 tiles), once for the session: posted to
    the HTTP job API (in process), run by a real scheduler on a local Ray cluster, written to the
    S3 server. The job API's side is checked in tests/test_jobs_service.py, the output's in
    tests/test_run_clouds.py: one run of the scene for both."""
    import json
    import time
    import uuid

    from fastapi.testclient import TestClient

    from tilefm.api.jobs import create_app
    from tilefm.storage import storage_for

    prefix = f"tilefm-whole-scene-{uuid.uuid4().hex[:8]}:"
    output_prefix = f"s3://tilefm/whole-scene/{uuid.uuid4().hex[:8]}/"
    env = {**tiler_env, "TILEFM_REDIS_PREFIX": prefix, "TILEFM_ALLOWED_OUTPUTS": json.dumps([output_prefix])}
    tmp = tmp_path_factory.mktemp("whole-scene")
    log = tmp / "scheduler.log"
    proc = start_scheduler(env, log)
    try:
        spec = {
            "scene": {"s2": str(scene_dir)},
            "model": "ukis-csmask",
            "zoom": 11,
            "output_prefix": output_prefix,
        }
        with TestClient(create_app(settings_from(env))) as api:
            r = api.post("/v1/jobs", json=spec)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            events = []
            with api.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
            done = api.get(f"/v1/jobs/{job_id}").json()
        assert done["state"] == "succeeded", f"{done}\nscheduler log:\n{log.read_text()[-3000:]}"
        cog_uri, stac_uri = done["outputs"]
        # the parts go once the COG is published (deleted just after the job is marked succeeded:
        # the other order would lose a job whose scheduler dies between the two steps)
        parts = cog_uri.rsplit("/", 1)[0] + f"/.parts-{job_id}/"
        client = storage_for(parts, s3_settings).client
        deadline = time.monotonic() + 30
        while (
            left := client.list_objects_v2(Bucket="tilefm", Prefix=parts.split("tilefm/", 1)[1]).get(
                "KeyCount", 0
            )
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        cog, stac = tmp / cog_uri.rsplit("/", 1)[1], tmp / stac_uri.rsplit("/", 1)[1]
        storage_for(cog_uri, s3_settings).get_file(cog_uri, cog)
        stac.write_bytes(storage_for(stac_uri, s3_settings).read_bytes(stac_uri))
    finally:
        stop_process(proc)  # its Ray cluster goes with it, not kept through the session
    yield WholeSceneRun(
        status_code=r.status_code,
        location=r.headers["Location"],
        submitted=r.json(),
        events=events,
        job=done,
        parts_left=left,
        cog_uri=cog_uri,
        stac_uri=stac_uri,
        cog=cog,
        stac=stac,
    )
    drop_redis_keys(prefix)


@pytest.fixture(scope="session")
def tiler_app(tiler_env: dict[str, str]):
    from tilefm.api.tiler import create_app

    return create_app(settings_from(tiler_env), viewer_dir=REPO / "services" / "tiler" / "viewer")


@pytest.fixture(scope="session")
def tiler_server(tiler_app, finished_jobs: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """The tile server over HTTP on 127.0.0.1 (uvicorn in a thread): (base_url, finished_jobs)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(tiler_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the tile server did not start"
    yield f"http://127.0.0.1:{port}", finished_jobs
    server.should_exit = True
    thread.join(10)
