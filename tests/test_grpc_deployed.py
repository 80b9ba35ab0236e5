"""The job API as deployed: `tilefm serve` in its own process, HTTP and gRPC, with API keys.

The gRPC server must still listen once the HTTP app's start-up has run a full garbage collection
(a server nothing refers to is collected and stops listening), and must enforce the HTTP API's keys
and scopes on every method, the streaming Watch included. The process is stopped with SIGTERM,
which must take the gRPC port down with it."""

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
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import CLOUDS_BBOX, drop_redis_keys, run_cli, stop_process

from tilefm.api.auth import hash_key
from tilefm.jobs.models import JobSpec
from tilefm.jobs.proto import pb, pb_grpc, spec_to_proto

#: `tilefm serve` as a process of its own
pytestmark = pytest.mark.integration

RW_KEY, RO_KEY = "rw-" + uuid.uuid4().hex, "ro-" + uuid.uuid4().hex
RPC_TIMEOUT = 60
#: seconds the tests wait after /healthz answers, so that everything start-up does (the lifespan's
#: gc.collect included) is over before the gRPC port is looked at
SETTLE_S = 3.0
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _key_entry(key: str, name: str, scopes: list[str]) -> dict:
    """The TILEFM_API_KEYS entry `tilefm keys KEY` prints, renamed and scoped."""
    result = run_cli("keys", key, timeout=120)
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    return {**entry, "name": name, "scopes": scopes}


@dataclass
class Deployment:
    proc: subprocess.Popen
    http: str
    grpc_port: int
    log: Path
    out_dir: Path
    redis_prefix: str

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def keys_env(shared_dir: Path) -> dict[str, str]:
    return {
        "TILEFM_API_KEYS": json.dumps(
            [
                _key_entry(RW_KEY, "rw", ["jobs:read", "jobs:write"]),
                _key_entry(RO_KEY, "ro", ["jobs:read"]),
            ]
        ),
        "TILEFM_AUTH_DISABLED": "false",
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(shared_dir / "data")]),
    }


def _start(keys_env: dict[str, str], tmp: Path) -> Deployment:
    """`tilefm serve` on free ports with its own Redis key prefix, once /healthz answers and
    start-up has settled."""
    port, grpc_port = _free_port(), _free_port()
    out_dir = tmp / "out"
    prefix = f"tilefm-deployed-{uuid.uuid4().hex[:8]}:"
    env = {
        **os.environ,
        **keys_env,
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_ALLOWED_OUTPUTS": json.dumps([f"file://{out_dir}/"]),
    }
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tilefm",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
        ],
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115 - the server writes to it for its whole life
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dep = Deployment(proc, f"http://127.0.0.1:{port}", grpc_port, log, out_dir, prefix)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"tilefm serve exited ({proc.returncode}):\n{dep.log_tail()}"
        try:
            if httpx.get(dep.http + "/healthz", timeout=2).status_code == 200:
                time.sleep(SETTLE_S)
                return dep
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    drop_redis_keys(prefix)
    raise AssertionError(f"tilefm serve did not answer /healthz in {START_TIMEOUT_S} s:\n{dep.log_tail()}")


@pytest.fixture(scope="module")
def deployment(keys_env: dict[str, str], tmp_path_factory) -> Iterator[Deployment]:
    dep = _start(keys_env, tmp_path_factory.mktemp("deployed"))
    try:
        yield dep
    finally:
        stop_process(dep.proc)
        drop_redis_keys(dep.redis_prefix)


@pytest.fixture(scope="module")
def stub(deployment: Deployment) -> Iterator[pb_grpc.JobServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{deployment.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.JobServiceStub(channel)


@pytest.fixture(scope="module")
def spec(deployment: Deployment, scene_dir: Path) -> pb.JobSpec:
    """A job the service accepts: the cloud mask of part of the sample scene."""
    return spec_to_proto(
        JobSpec(
            scene={"s2": str(scene_dir)},
            model="ukis-csmask",
            zoom=11,
            bbox=tuple(CLOUDS_BBOX),
            output_prefix=f"file://{deployment.out_dir}/",
        )
    )


@pytest.fixture(scope="module")
def job_id(stub: pb_grpc.JobServiceStub, spec: pb.JobSpec) -> str:
    """A queued job (no scheduler runs here), submitted with the read-write key."""
    reply = stub.Submit(pb.SubmitRequest(spec=spec), timeout=RPC_TIMEOUT, metadata=_bearer(RW_KEY))
    return reply.job.id


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _call(
    stub: pb_grpc.JobServiceStub, method: str, job_id: str, spec: pb.JobSpec, metadata: list[tuple[str, str]]
):
    """Calls `method` and returns its reply (Watch: the first event, then the stream is left)."""
    requests = {
        "List": lambda: pb.ListJobsRequest(limit=5),
        "Get": lambda: pb.GetJobRequest(id=job_id),
        "Watch": lambda: pb.WatchJobRequest(id=job_id),
        "Submit": lambda: pb.SubmitRequest(spec=spec),
        "Cancel": lambda: pb.CancelJobRequest(id=job_id),
    }
    result = getattr(stub, method)(requests[method](), timeout=RPC_TIMEOUT, metadata=metadata)
    if method == "Watch":
        first = next(result)
        result.cancel()
        return first
    return result


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


METHODS = ["List", "Get", "Watch", "Submit", "Cancel"]
BAD_CREDENTIALS = {
    "no-key": [],
    "unknown-bearer": [("authorization", "Bearer not-a-key")],
    "unknown-x-api-key": [("x-api-key", "not-a-key")],
    "empty-bearer": [("authorization", "Bearer ")],
    "basic-scheme": [("authorization", f"Basic {RW_KEY}")],
    "hash-as-key": [
        ("authorization", f"Bearer {hash_key(RW_KEY)}")
    ],  # the configured sha256, which is not the key
}


def test_grpc_port_listens_after_start_up(deployment: Deployment) -> None:
    assert deployment.proc.poll() is None, deployment.log_tail()
    assert _listening(deployment.grpc_port), f"nothing listens on the gRPC port:\n{deployment.log_tail()}"
    with grpc.insecure_channel(f"127.0.0.1:{deployment.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_without_a_known_key_every_method_is_unauthenticated(
    stub, job_id: str, spec: pb.JobSpec, method: str, credentials: str
) -> None:
    metadata = BAD_CREDENTIALS[credentials]
    assert _code(lambda: _call(stub, method, job_id, spec, metadata)) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["Submit", "Cancel"])
def test_a_read_only_key_may_not_write(stub, job_id: str, spec: pb.JobSpec, method: str) -> None:
    for metadata in (_bearer(RO_KEY), [("x-api-key", RO_KEY)]):
        with pytest.raises(grpc.RpcError) as err:
            _call(stub, method, job_id, spec, metadata)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "jobs:write" in err.value.details()


@pytest.mark.parametrize("method", ["List", "Get", "Watch"])
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_read_only_key_may_read(stub, job_id: str, spec: pb.JobSpec, method: str, header: str) -> None:
    metadata = _bearer(RO_KEY) if header == "authorization" else [("x-api-key", RO_KEY)]
    reply = _call(stub, method, job_id, spec, metadata)
    if method == "List":
        assert job_id in [j.id for j in reply.jobs]
    else:
        assert (reply.job_id if method == "Watch" else reply.id) == job_id


def test_the_read_write_key_submits_follows_and_cancels(stub, spec: pb.JobSpec) -> None:
    auth = [("x-api-key", RW_KEY)]
    reply = stub.Submit(
        pb.SubmitRequest(spec=spec, idempotency_key=uuid.uuid4().hex), timeout=RPC_TIMEOUT, metadata=auth
    )
    assert reply.created and reply.job.state == pb.JOB_STATE_QUEUED
    assert reply.job.progress.tiles_total == 12  # planned against the real scene
    job_id = reply.job.id
    assert (
        stub.Get(pb.GetJobRequest(id=job_id), timeout=RPC_TIMEOUT, metadata=auth).state == pb.JOB_STATE_QUEUED
    )
    assert job_id in [j.id for j in stub.List(pb.ListJobsRequest(), timeout=RPC_TIMEOUT, metadata=auth).jobs]
    watch = stub.Watch(pb.WatchJobRequest(id=job_id), timeout=RPC_TIMEOUT, metadata=auth)
    assert next(watch).state == pb.JOB_STATE_QUEUED
    cancelled = stub.Cancel(pb.CancelJobRequest(id=job_id), timeout=RPC_TIMEOUT, metadata=_bearer(RW_KEY))
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert [e.state for e in watch][-1] == pb.JOB_STATE_CANCELLED  # the open stream ends with the final state


def test_http_enforces_the_same_keys(deployment: Deployment, spec: pb.JobSpec) -> None:
    from tilefm.jobs.proto import spec_to_dict

    body = {k: list(v) if isinstance(v, tuple) else v for k, v in spec_to_dict(spec).items()}
    with httpx.Client(base_url=deployment.http, timeout=RPC_TIMEOUT) as http:
        assert http.get("/v1/jobs").status_code == 401
        assert http.get("/v1/jobs", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
        assert http.get("/v1/jobs", headers={"X-API-Key": RO_KEY}).status_code == 200
        assert http.post("/v1/jobs", json=body, headers={"X-API-Key": RO_KEY}).status_code == 403
        created = http.post("/v1/jobs", json=body, headers={"X-API-Key": RW_KEY})
        assert created.status_code == 202, created.text
        assert (
            http.post(f"/v1/jobs/{created.json()['id']}:cancel", headers={"X-API-Key": RW_KEY}).status_code
            == 200
        )


def test_sigterm_stops_http_and_grpc(keys_env: dict[str, str], tmp_path: Path) -> None:
    dep = _start(keys_env, tmp_path)
    try:
        assert _listening(dep.grpc_port), dep.log_tail()
        os.kill(dep.proc.pid, signal.SIGTERM)  # the process alone, as a container runtime does
        dep.proc.wait(30)
        # the exit status `serve` gives a SIGTERM: its handler ran, and with it the gRPC shutdown
        assert dep.proc.returncode == 128 + signal.SIGTERM, dep.log_tail()
        assert not _listening(dep.grpc_port), "the gRPC port outlived the process"
    finally:
        stop_process(dep.proc)
        drop_redis_keys(dep.redis_prefix)
