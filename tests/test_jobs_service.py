"""The job service end to end: the HTTP API (in-process) over real Redis, a scheduler subprocess on
a local Ray cluster, outputs on a real SeaweedFS S3. Crash and restart of the scheduler and of
the API process mid-job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import rasterio
from conftest import WholeSceneRun, drop_redis_keys, settings_from, start_scheduler, stop_process
from fastapi.testclient import TestClient
from rio_cogeo import cog_validate

from tilefm.api.auth import hash_key
from tilefm.api.jobs import create_app
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings
from tilefm.storage import storage_for

KEY, READ_ONLY_KEY = "test-key-" + uuid.uuid4().hex, "read-key-" + uuid.uuid4().hex
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL_BBOX = [-11.5, 24.7, -11.3, 24.85]  # a few tiles in the middle of the scene


@pytest.fixture(scope="module")
def env(s3_settings: Settings) -> Iterator[dict[str, str]]:
    prefix = f"tilefm-test-{uuid.uuid4().hex[:8]}:"
    values = {
        **{k: v for k, v in os.environ.items() if k.startswith("TILEFM_")},
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_JOB_LEASE_S": "4",
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(SHARED_DATA), "/tmp"]),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps(["s3://tilefm/", "s3://no-such-bucket-tilefm/"]),
        "TILEFM_API_KEYS": json.dumps(
            [
                {"name": "rw", "sha256": hash_key(KEY), "scopes": ["jobs:read", "jobs:write"]},
                {"name": "ro", "sha256": hash_key(READ_ONLY_KEY), "scopes": ["jobs:read"]},
            ]
        ),
    }
    yield values
    drop_redis_keys(prefix)


@pytest.fixture(scope="module")
def api(env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(env)), headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def scheduler(env: dict[str, str], tmp_path_factory) -> Iterator[dict]:
    log = tmp_path_factory.mktemp("sched") / "scheduler.log"
    holder = {"proc": start_scheduler(env, log), "log": log}
    yield holder
    stop_process(holder["proc"])


def _wait(api: TestClient, job_id: str, states: set[str], timeout: float = 300, until=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states or (until and until(job)):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


def _spec(scene_dir: Path, model: str = "ukis-csmask", bbox=SMALL_BBOX, **kw) -> dict:
    spec = {
        "scene": {"s2": str(scene_dir)},
        "model": model,
        "zoom": 11 if model == "ukis-csmask" else 10,
        "output_prefix": f"s3://tilefm/jobs/{uuid.uuid4().hex[:8]}/",
        **kw,
    }
    if bbox:
        spec["bbox"] = bbox
    return spec


def test_cloud_job_over_http_succeeds_with_events(whole_scene_clouds: WholeSceneRun, s3_settings) -> None:
    """The whole scene's cloud job posted over HTTP (`whole_scene_clouds`, tests/conftest.py, whose
    output tests/test_run_clouds.py checks): accepted, streamed to its end, published."""
    run = whole_scene_clouds
    assert run.status_code == 202, run.submitted
    job = run.submitted
    assert job["state"] == "queued" and job["progress"]["tiles_total"] == 56
    assert run.location == f"/v1/jobs/{job['id']}"
    events = run.events
    assert events[-1]["state"] == "succeeded", events[-3:]
    assert any(e["state"] == "running" and e["progress"]["tiles_done"] > 0 for e in events)
    done = run.job
    assert (
        done["state"] == "succeeded"
        and done["progress"]["tiles_done"] == 56
        and done["progress"]["tiles_failed"] == 0
    )
    cog_uri, stac_uri = done["outputs"]
    assert cog_validate(str(run.cog), quiet=True)[0]
    with rasterio.open(run.cog) as src:
        assert src.crs.to_epsg() == 3857 and src.tags()["TILEFM_JOB"] == job["id"]
    assert (
        json.loads(storage_for(stac_uri, s3_settings).read_bytes(stac_uri))["assets"]["data"]["href"]
        == cog_uri
    )
    # the parts go once the COG is published (deleted just after the job is marked succeeded:
    # the other order would lose a job whose scheduler dies between the two steps)
    assert run.parts_left == 0, f"{run.parts_left} parts left 30 s after the job succeeded"


def test_presto_job_over_http(api: TestClient, scheduler, scene_dir: Path) -> None:
    r = api.post("/v1/jobs", json=_spec(scene_dir, model="presto", bbox=[-11.5, 24.7, -11.4, 24.8]))
    assert r.status_code == 202, r.text
    job = _wait(api, r.json()["id"], {"succeeded", "failed"})
    assert job["state"] == "succeeded", job
    assert job["outputs"][0].endswith("/presto.tif")


def test_idempotency(api: TestClient, scene_dir: Path) -> None:
    spec = _spec(scene_dir)
    key = uuid.uuid4().hex
    a = api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    b = api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    assert a.status_code == 202 and b.status_code == 200 and a.json()["id"] == b.json()["id"]
    c = api.post("/v1/jobs", json={**spec, "priority": 9}, headers={"Idempotency-Key": key})
    assert c.status_code == 409 and c.json()["error"]["field"] == "Idempotency-Key"
    api.post(f"/v1/jobs/{a.json()['id']}:cancel")


def test_cancel_mid_job_removes_partial_outputs(
    api: TestClient, scheduler, scene_dir: Path, s3_settings
) -> None:
    r = api.post("/v1/jobs", json=_spec(scene_dir, bbox=None))
    job_id = r.json()["id"]
    _wait(api, job_id, set(), until=lambda j: j["progress"]["tiles_done"] >= 3)
    t0 = time.monotonic()
    assert api.post(f"/v1/jobs/{job_id}:cancel").status_code == 200
    job = _wait(api, job_id, {"cancelled", "succeeded", "failed"}, timeout=30)
    assert job["state"] == "cancelled"
    assert time.monotonic() - t0 < 15
    prefix = r.json()["spec"]["output_prefix"].split("tilefm/", 1)[1]
    client = storage_for("s3://tilefm/x", s3_settings).client
    time.sleep(1)
    assert client.list_objects_v2(Bucket="tilefm", Prefix=prefix).get("KeyCount", 0) == 0
    # a cancelled job cannot be cancelled into another state
    assert api.post(f"/v1/jobs/{job_id}:cancel").json()["state"] == "cancelled"


def test_list_paginates_and_filters(api: TestClient, scene_dir: Path) -> None:
    ids = [
        api.post("/v1/jobs", json=_spec(scene_dir, priority=0, labels={"batch": "list"})).json()["id"]
        for _ in range(5)
    ]
    for i in ids[:2]:
        api.delete(f"/v1/jobs/{i}")
    for i in ids[:2]:  # a job the scheduler already took stops at its next step
        _wait(api, i, {"cancelled"}, timeout=30)
    seen, cursor = [], None
    while True:
        page = api.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen)
    created = [j["timings"]["created"] for j in api.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    assert created == sorted(created, reverse=True)
    cancelled = {
        j["id"] for j in api.get("/v1/jobs", params={"state": "cancelled", "limit": 100}).json()["jobs"]
    }
    assert set(ids[:2]) <= cancelled and not set(ids[2:]) & cancelled
    for i in ids[2:]:
        api.delete(f"/v1/jobs/{i}")


def test_auth(api: TestClient, env: dict[str, str], scene_dir: Path) -> None:
    with TestClient(create_app(settings_from(env))) as anon:
        assert anon.get("/v1/jobs").status_code == 401
        assert anon.get("/v1/jobs", headers={"X-API-Key": "wrong"}).status_code == 401
        assert anon.get("/v1/jobs", headers={"X-API-Key": READ_ONLY_KEY}).status_code == 200
        r = anon.post("/v1/jobs", json=_spec(scene_dir), headers={"X-API-Key": READ_ONLY_KEY})
        assert r.status_code == 403 and "jobs:write" in r.json()["error"]["message"]
        assert anon.get("/healthz").status_code == 200 and anon.get("/v1/models").status_code == 200


BAD = {
    "malformed JSON": ("{not json", 400, "body"),
    "wrong type": (
        {"scene": {"s2": "x"}, "model": "presto", "output_prefix": "s3://tilefm/x/", "zoom": "ten"},
        422,
        "zoom",
    ),
    "unknown field": (
        {"scene": {"s2": "x"}, "model": "presto", "output_prefix": "s3://tilefm/x/", "colour": 1},
        422,
        "colour",
    ),
    "unknown model": ({"model": "nope"}, 422, "model"),
    "missing bands": ({"scene": {"s2": "{no_b11}"}}, 422, "scene.s2"),
    "unreadable source": ({"scene": {"s2": "/nonexistent"}}, 422, "scene.s2"),
    "oversized area": ({"zoom": 16, "bbox": None}, 422, "zoom"),
    "bad zoom": ({"zoom": 40}, 422, "zoom"),
    "bbox outside": ({"bbox": [10, 10, 11, 11]}, 422, "bbox"),
    "bad uri scheme": ({"output_prefix": "gs://bucket/x/"}, 422, "output_prefix"),
    "missing bucket": ({"output_prefix": "s3://no-such-bucket-tilefm/x/"}, 422, "output_prefix"),
    "bad priority": ({"priority": 11}, 422, "priority"),
    "source not allowed": ({"scene": {"s2": "/etc"}}, 422, "scene.s2"),
    "source escapes": ({"scene": {"s2": "{no_b11}/../../../etc"}}, 422, "scene.s2"),
    "output not allowed": ({"output_prefix": "file:///etc/"}, 422, "output_prefix"),
    "unknown precision": ({"precision": "fp8"}, 422, "precision"),
    "precision the model lacks": ({"precision": "int8"}, 422, "precision"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_clear_4xx(case: str, api: TestClient, scene_dir: Path, tmp_path: Path) -> None:
    body, status, field = BAD[case]
    if isinstance(body, dict):
        no_b11 = tmp_path / "no-b11"
        no_b11.mkdir()
        for b in ["B02", "B03", "B04", "B08", "B12"]:
            os.symlink(scene_dir / f"{b}.tif", no_b11 / f"{b}.tif")
        spec = _spec(scene_dir)
        for k, v in body.items():
            spec[k] = {m: s.format(no_b11=no_b11) for m, s in v.items()} if isinstance(v, dict) else v
        spec = {k: v for k, v in spec.items() if v is not None}
        r = api.post("/v1/jobs", json=spec)
    else:
        r = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert field in (err["field"] or "") + err["message"], err
    assert err["message"]


def test_unknown_job_is_404(api: TestClient) -> None:
    r = api.get(f"/v1/jobs/{'0' * 32}")
    assert r.status_code == 404 and r.json()["error"]["field"] == "id"
    assert api.get("/v1/jobs/not-an-id").status_code == 404


def test_metrics_and_readiness(api: TestClient) -> None:
    text = api.get("/metrics").text
    assert "tilefm_jobs{" in text and "tilefm_queue_depth" in text and "tilefm_http_requests_total" in text
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"] == "ok" and ready.json()["checks"]["object_store"] == "ok"


def _start_api(env: dict[str, str], port: int) -> subprocess.Popen:
    """The API as its own process (as deployed), once it answers /healthz."""
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "tilefm.api.jobs:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(150):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_process(proc)
    raise AssertionError("the API did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_and_api_restart_mid_job(
    env: dict[str, str], scheduler, scene_dir: Path, tmp_path: Path
) -> None:
    """Kill the scheduler (the worker process) and restart the API process while a job runs: the
    job is still tracked, resumes without redoing finished tiles, and finishes with every tile once."""
    port = _free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=30)
    api_proc = _start_api(env, port)
    try:
        # 20 tiles: long enough to crash in the middle of, a third of the whole scene's time
        job_id = http.post("/v1/jobs", json=_spec(scene_dir, bbox=[-11.8, 24.45, -11.2, 25.0])).json()["id"]
        deadline = time.monotonic() + 120
        while http.get(f"/v1/jobs/{job_id}").json()["progress"]["tiles_done"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        stop_process(scheduler["proc"], signal.SIGKILL)  # the worker dies without a word
        stop_process(api_proc, signal.SIGKILL)
        api_proc = _start_api(env, port)
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "running"
        done_before = job["progress"]["tiles_done"]
        scheduler["proc"] = start_scheduler(env, scheduler["log"])
        deadline = time.monotonic() + 300
        while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(1)
        assert job["state"] == "succeeded", job
        assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"] == 20
        assert "re-queued" in scheduler["log"].read_text()
        # resumed: the second run planned only the tiles not done before the crash
        store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=env["TILEFM_REDIS_PREFIX"])
        starts = [
            e.message
            for _, e in store.events(job_id, "0", block_ms=0, count=1000)
            if e.message.startswith("running:")
        ]
        assert starts[0] == "running: 20 of 20 tiles to do"
        assert starts[-1] == f"running: {20 - done_before} of 20 tiles to do", starts
        assert 0 < done_before < 20
    finally:
        stop_process(api_proc)


def test_jobs_over_grpc_succeed_and_watch_ends_final(
    env: dict[str, str], scheduler, scene_dir: Path, s3_settings, tmp_path: Path
) -> None:
    """Both models through the gRPC JobService, run by the scheduler; Watch streams to the end."""
    import grpc

    from tilefm.api.grpc_service import create_server
    from tilefm.jobs.models import JobSpec
    from tilefm.jobs.proto import event_from_proto, job_from_proto, pb, pb_grpc, spec_to_proto
    from tilefm.jobs.service import JobService

    settings = settings_from(env)
    service = JobService(JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix), settings)
    server, port = create_server(service, "127.0.0.1:0")
    server.start()
    auth = [("authorization", f"Bearer {KEY}")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.JobServiceStub(channel)
            for model, bbox in (("presto", [-11.5, 24.7, -11.4, 24.8]), ("ukis-csmask", SMALL_BBOX)):
                spec = JobSpec.model_validate(_spec(scene_dir, model=model, bbox=bbox))
                reply = stub.Submit(
                    pb.SubmitRequest(spec=spec_to_proto(spec), idempotency_key=uuid.uuid4().hex),
                    timeout=60,
                    metadata=auth,
                )
                assert reply.created
                events = [
                    event_from_proto(e)
                    for e in stub.Watch(pb.WatchJobRequest(id=reply.job.id), timeout=300, metadata=auth)
                ]
                assert events[-1].state.value == "succeeded", events[-3:]
                job = job_from_proto(stub.Get(pb.GetJobRequest(id=reply.job.id), timeout=10, metadata=auth))
                assert job.progress.tiles_done == job.progress.tiles_total > 0
                local = tmp_path / f"{model}.tif"
                storage_for(job.outputs[0], s3_settings).get_file(job.outputs[0], local)
                assert cog_validate(str(local), quiet=True)[0]
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(pb.GetJobRequest(id="0" * 32), timeout=10, metadata=auth)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(0)


def test_cli_client_submits_and_follows(env: dict[str, str], scheduler, scene_dir: Path) -> None:
    """`tilefm jobs submit/list/watch` against a live API process."""
    port = _free_port()
    full_env = {**os.environ, **env, "TILEFM_API_URL": f"http://127.0.0.1:{port}", "TILEFM_API_KEY": KEY}
    api_proc = _start_api(env, port)
    try:

        def run(*a: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "tilefm", "jobs", *a],
                env=full_env,
                capture_output=True,
                text=True,
                timeout=300,
            )

        r = run(
            "submit",
            "--scene",
            f"s2={scene_dir}",
            "--model",
            "ukis-csmask",
            "--zoom",
            "11",
            "--bbox",
            ",".join(map(str, SMALL_BBOX)),
            "--out",
            "s3://tilefm/cli/",
            "--no-watch",
        )
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        assert job_id in run("list").stdout
        r = run("watch", job_id)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "succeeded"
        r = run("submit", "--scene", f"s2={scene_dir}", "--model", "nope", "--out", "s3://tilefm/cli/")
        assert r.returncode == 2 and "model" in r.stderr and "Traceback" not in r.stderr
    finally:
        stop_process(api_proc)


def test_validation_cache_serves_stale_while_one_thread_remakes() -> None:
    import threading

    from tilefm.jobs.service import _TTLCache

    cache = _TTLCache(ttl_s=0.2, stale_s=5.0)
    calls: list[int] = []
    gate = threading.Event()

    def make(value: int, block: bool = False):
        def _make():
            calls.append(value)
            if block:
                gate.wait(5)
            if value < 0:
                raise OSError("gone")
            return value

        return _make

    # concurrent misses: one make, every caller gets its value
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("k", make(1, block=True)))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [1] * 6 and calls == [1]
    assert cache.get("k", make(2)) == 1 and calls == [1]  # fresh: no remake
    time.sleep(0.3)
    gate.clear()
    t0 = time.monotonic()
    assert cache.get("k", make(2, block=True)) == 1  # expired: the stale value at once ...
    assert cache.get("k", make(3)) == 1 and time.monotonic() - t0 < 0.1  # ... one remake only
    gate.set()
    deadline = time.monotonic() + 5
    while cache.get("k", make(4)) != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.get("k", make(4)) == 2 and calls == [1, 2]
    # a failed remake drops the entry: the next caller makes it again and sees the error
    time.sleep(0.3)
    assert cache.get("k", make(-1)) == 2
    deadline = time.monotonic() + 5
    while "k" in cache.items and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="gone"):
        cache.get("k", make(-1))
