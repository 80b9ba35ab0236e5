"""tilefm on a real multi-node Ray cluster: a head (1 CPU) and a node that declares the custom
resource `encoder` (standing in for a GPU node), each its own `ray start` with token auth
(tests/ray_cluster.py). With TILEFM_ENCODER_RESOURCES='{"encoder": 1}' the encoder actors go to
that node only, the reader tasks anywhere. The job service's scheduler and `tilefm run` join it
as drivers (the GCS address) and through Ray Client (ray://); killing the encoder node's raylet
mid-job fails the job with an error naming what no node has, and the scheduler carries on."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import drop_redis_keys, run_cli, settings_from, start_scheduler, stop_process
from fastapi.testclient import TestClient
from ray_cluster import RayCluster, RayNode, _procs, descendants

from tilefm.api.jobs import create_app
from tilefm.jobs.store import JobStore

pytestmark = pytest.mark.integration

ENCODER = {"encoder": 1}
SMALL_BBOX = [-11.5, 24.7, -11.4, 24.8]  # z11: 4 tiles


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    c = RayCluster()
    try:
        c.add_node("encoder", num_cpus=1, resources=ENCODER)
        yield c
    finally:
        c.shutdown()


def _node(cluster: RayCluster, name: str) -> RayNode:
    return next(n for n in cluster.nodes if n.name == name)


def encoder_actor_pids(node: RayNode) -> list[int]:
    """Encoder actor processes under the node's raylet (Ray's workers are its children)."""
    procs = _procs()
    return [
        p
        for p in descendants(node.raylet(), procs)
        if procs[p][1] and procs[p][1][0].startswith("ray::EncoderActor")
    ]


@pytest.fixture(scope="module")
def env(cluster: RayCluster) -> Iterator[dict[str, str]]:
    prefix = f"tilefm-test-{uuid.uuid4().hex[:8]}:"
    values = {
        **{k: v for k, v in os.environ.items() if k.startswith("TILEFM_")},
        **cluster.env,
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_JOB_LEASE_S": "10",
        "TILEFM_AUTH_DISABLED": "true",
        "TILEFM_RAY_ADDRESS": cluster.address,
        "TILEFM_ENCODER_RESOURCES": json.dumps(ENCODER),
        # how long a job waits for a node that can take its encoders (after its own one died)
        "TILEFM_ENCODER_START_TIMEOUT_S": "20",
        "TILEFM_MAX_BATCH": "1",  # a batch per tile: the kill lands mid-job
    }
    yield values
    drop_redis_keys(prefix)


@pytest.fixture(scope="module")
def api(env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(env))) as client:
        yield client


@pytest.fixture(scope="module")
def scheduler(env: dict[str, str], tmp_path_factory) -> Iterator[dict]:
    log = tmp_path_factory.mktemp("sched") / "scheduler.log"
    holder = {"proc": start_scheduler(env, log), "log": log}
    yield holder
    stop_process(holder["proc"])


def _wait(api: TestClient, job_id: str, timeout: float = 240, until=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled") or (until and until(job)):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


def _submit(api: TestClient, scene_dir: Path, out: Path, bbox=SMALL_BBOX) -> dict:
    spec = {
        "scene": {"s2": str(scene_dir)},
        "model": "ukis-csmask",
        "zoom": 11,
        "output_prefix": out.as_uri() + "/",
    }
    if bbox:
        spec["bbox"] = bbox
    r = api.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    return r.json()


def _recorded_once(env: dict[str, str], job: dict) -> set[str]:
    """The tiles recorded done, checking that the count the job shows is the set's size (a tile
    recorded twice would count twice)."""
    store = JobStore.from_url(
        env.get("TILEFM_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix=env["TILEFM_REDIS_PREFIX"]
    )
    done = store.tiles_done(job["id"])
    assert job["progress"]["tiles_done"] == len(done), job["progress"]
    return done


# first: the scheduler below keeps its encoder actor, which holds the cluster's only `encoder`
# resource, between jobs (a run's actor would wait for it)
@pytest.mark.parametrize("mode", ["gcs", "client"])
def test_tilefm_run_on_the_cluster(
    mode: str, cluster: RayCluster, env: dict[str, str], scene_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "clouds.tif"
    address = cluster.address if mode == "gcs" else cluster.client_address
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "ukis-csmask",
        "--zoom",
        "11",
        "--bbox",
        ",".join(map(str, SMALL_BBOX)),
        "--out",
        out.as_uri(),
        env={**env, "TILEFM_RAY_ADDRESS": address},
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert out.is_file()


def test_job_runs_its_encoders_on_the_encoder_node(
    cluster: RayCluster, api: TestClient, scheduler, env, scene_dir: Path, tmp_path: Path
) -> None:
    job = _submit(api, scene_dir, tmp_path / "out")
    total = job["progress"]["tiles_total"]
    job = _wait(api, job["id"])
    log = scheduler["log"].read_text()[-3000:]
    assert job["state"] == "succeeded", f"{job}\n{log}"
    assert job["progress"]["tiles_done"] == total and job["progress"]["tiles_failed"] == 0
    assert len(_recorded_once(env, job)) == total
    assert Path(job["outputs"][0].removeprefix("file://")).is_file()
    # the scheduler keeps its actors between jobs: they are on the encoder node, none on the head
    assert encoder_actor_pids(_node(cluster, "encoder")), "no encoder actor on the node with the resource"
    assert not encoder_actor_pids(_node(cluster, "head"))


def test_killed_encoder_node_fails_the_job_and_the_scheduler_carries_on(
    cluster: RayCluster, api: TestClient, scheduler, env, scene_dir: Path, tmp_path: Path
) -> None:
    job = _submit(api, scene_dir, tmp_path / "out", bbox=None)  # the whole scene, a tile per batch
    job = _wait(api, job["id"], until=lambda j: j["progress"]["tiles_done"] >= 2)
    assert job["state"] == "running", job
    os.kill(_node(cluster, "encoder").raylet(), signal.SIGKILL)
    killed = time.monotonic()
    job = _wait(api, job["id"], timeout=120)
    log = scheduler["log"].read_text()[-3000:]
    assert job["state"] == "failed", f"{job}\n{log}"
    message = job["error"]["message"]
    assert (
        "no node of the Ray cluster can take an encoder actor" in message and "'encoder': 1.0" in message
    ), message
    assert time.monotonic() - killed < 90
    assert 2 <= len(_recorded_once(env, job)) < job["progress"]["tiles_total"]
    assert scheduler["proc"].poll() is None, log
    # a job submitted while no node has the resource fails the same way once its encoders had
    # their time to start, and the scheduler carries on
    job = _wait(api, _submit(api, scene_dir, tmp_path / "none")["id"], timeout=120)
    message = job["error"]["message"] if job["error"] else ""
    assert job["state"] == "failed" and "were not running after 20 s" in message, job
    assert "no node of the Ray cluster can take an encoder actor" in message, message
    assert scheduler["proc"].poll() is None, scheduler["log"].read_text()[-3000:]
    # a node with the resource joins again: the next job gets new encoders there
    cluster.add_node("encoder2", num_cpus=1, resources=ENCODER)
    job = _wait(api, _submit(api, scene_dir, tmp_path / "again")["id"])
    assert job["state"] == "succeeded", f"{job}\n{scheduler['log'].read_text()[-3000:]}"
    assert encoder_actor_pids(_node(cluster, "encoder2"))
