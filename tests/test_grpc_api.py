"""The gRPC job API end to end: a real server on 127.0.0.1, a real JobStore on the Redis at
127.0.0.1:6379 (under a random key prefix, removed afterwards), a JobService validating against the
real sample scene and model store."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import redis

from tilefm.api.auth import KeyRing
from tilefm.api.grpc_service import FIELD_METADATA_KEY, create_server
from tilefm.jobs.models import JobEvent, JobSpec, JobState, Progress
from tilefm.jobs.proto import job_from_proto, pb, pb_grpc, spec_to_proto, state_to_proto
from tilefm.jobs.service import JobService
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
RPC_TIMEOUT = 60


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"these tests need the Redis at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def store(redis_client: redis.Redis) -> Iterator[JobStore]:
    prefix = f"tilefm-test-{uuid.uuid4().hex[:12]}:"
    yield JobStore(redis_client, prefix)
    keys = list(redis_client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        redis_client.delete(*keys)
    assert not list(redis_client.scan_iter(match=prefix + "*"))


@pytest.fixture
def service(store: JobStore, model_store: Path) -> JobService:
    return JobService(store, Settings(model_store=model_store))


def _serve(service: JobService) -> Iterator[pb_grpc.JobServiceStub]:
    # authentication has its own tests (test_grpc_deployed.py): these run with it switched off
    server, port = create_server(
        service, "127.0.0.1:0", watch_poll_ms=100, keyring=KeyRing(Settings(auth_disabled=True))
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.JobServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None).wait()


@pytest.fixture
def stub(service: JobService) -> Iterator[pb_grpc.JobServiceStub]:
    yield from _serve(service)


@pytest.fixture
def spec(scene_dir: Path, tmp_path: Path) -> JobSpec:
    return JobSpec(
        scene={"s2": str(scene_dir)}, model="ukis-csmask", zoom=11, output_prefix=f"file://{tmp_path}/out/"
    )


def _rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=RPC_TIMEOUT, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)  # a stream fails when read
    return info.value


def _field_metadata(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY)


# -- Submit --------------------------------------------------------------------------------------


def test_submit_queues_a_validated_job(stub, store: JobStore, spec: JobSpec) -> None:
    res = stub.Submit(pb.SubmitRequest(spec=spec_to_proto(spec)), timeout=RPC_TIMEOUT)
    assert res.created
    assert res.job.state == pb.JOB_STATE_QUEUED
    assert res.job.progress.tiles_total > 0  # the plan was made against the real scene
    job = job_from_proto(res.job)
    assert job.spec == spec
    assert job == store.get(job.id)
    assert (
        res.job.spec.HasField("zoom")
        and not res.job.spec.HasField("bbox")
        and not res.job.spec.HasField("date")
    )


def test_submit_bad_model_is_invalid_argument(stub, spec: JobSpec) -> None:
    bad = spec.model_copy(update={"model": "no-such-model"})
    err = _rpc_error(stub.Submit, pb.SubmitRequest(spec=spec_to_proto(bad)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("model: ")
    assert "no-such-model" in err.details()
    assert _field_metadata(err) == "model"


def test_submit_missing_scene_is_invalid_argument(stub, spec: JobSpec, tmp_path: Path) -> None:
    bad = spec.model_copy(update={"scene": {"s2": str(tmp_path / "nowhere")}})
    err = _rpc_error(stub.Submit, pb.SubmitRequest(spec=spec_to_proto(bad)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("scene")


def test_submit_out_of_range_values_are_invalid_argument(stub, spec: JobSpec) -> None:
    msg = spec_to_proto(spec)
    msg.zoom = 23
    err = _rpc_error(stub.Submit, pb.SubmitRequest(spec=msg))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("zoom: ")
    assert _field_metadata(err) == "zoom"

    msg = spec_to_proto(spec)
    msg.backend = "cuda"
    err = _rpc_error(stub.Submit, pb.SubmitRequest(spec=msg))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("backend: ")

    err = _rpc_error(stub.Submit, pb.SubmitRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "spec: required"


def test_submit_is_idempotent_per_key(stub, store: JobStore, spec: JobSpec) -> None:
    key = uuid.uuid4().hex
    first = stub.Submit(pb.SubmitRequest(spec=spec_to_proto(spec), idempotency_key=key), timeout=RPC_TIMEOUT)
    again = stub.Submit(pb.SubmitRequest(spec=spec_to_proto(spec), idempotency_key=key), timeout=RPC_TIMEOUT)
    assert first.created and not again.created
    assert again.job.id == first.job.id
    jobs, _ = store.list(limit=10)
    assert [j.id for j in jobs] == [first.job.id]

    other = spec.model_copy(update={"priority": 7})
    err = _rpc_error(stub.Submit, pb.SubmitRequest(spec=spec_to_proto(other), idempotency_key=key))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details().startswith("idempotency_key: ")
    assert first.job.id in err.details()


# -- Get / List / Cancel -------------------------------------------------------------------------


def test_get(stub, store: JobStore, spec: JobSpec) -> None:
    job, _ = store.create(spec)
    got = stub.Get(pb.GetJobRequest(id=job.id), timeout=RPC_TIMEOUT)
    assert job_from_proto(got) == store.get(job.id)


def test_not_found(stub) -> None:
    missing = uuid.uuid4().hex
    for call, req in [
        (stub.Get, pb.GetJobRequest(id=missing)),
        (stub.Cancel, pb.CancelJobRequest(id=missing)),
        (stub.Watch, pb.WatchJobRequest(id=missing)),
    ]:
        err = _rpc_error(call, req)
        assert err.code() == grpc.StatusCode.NOT_FOUND, call
        assert err.details().startswith("id: ") and missing in err.details()
    err = _rpc_error(stub.Get, pb.GetJobRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "id: required"


def test_list_pages_and_filters(stub, store: JobStore, spec: JobSpec) -> None:
    ids = []
    for i in range(5):
        job, _ = store.create(spec.model_copy(update={"labels": {"n": str(i)}}))
        ids.append(job.id)
        time.sleep(0.002)  # distinct creation times: a well-defined newest-first order
    store.request_cancel(ids[1])

    seen, cursor = [], ""
    for _ in range(5):
        page = stub.List(pb.ListJobsRequest(limit=2, cursor=cursor), timeout=RPC_TIMEOUT)
        assert len(page.jobs) <= 2
        seen += [j.id for j in page.jobs]
        cursor = page.next_cursor
        if not cursor:
            break
    assert seen == ids[::-1]

    everything = stub.List(pb.ListJobsRequest(), timeout=RPC_TIMEOUT)  # limit 0: the default
    assert [j.id for j in everything.jobs] == ids[::-1] and everything.next_cursor == ""

    cancelled = stub.List(pb.ListJobsRequest(state=pb.JOB_STATE_CANCELLED), timeout=RPC_TIMEOUT)
    assert [j.id for j in cancelled.jobs] == [ids[1]]
    queued = stub.List(pb.ListJobsRequest(state=state_to_proto(JobState.QUEUED)), timeout=RPC_TIMEOUT)
    assert {j.id for j in queued.jobs} == set(ids) - {ids[1]}

    err = _rpc_error(stub.List, pb.ListJobsRequest(limit=100_000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("limit: ")
    err = _rpc_error(stub.List, pb.ListJobsRequest(cursor="not-a-cursor"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("cursor: ")
    err = _rpc_error(stub.List, pb.ListJobsRequest(state=42))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("state: ")


def _succeed(store: JobStore, job_id: str) -> None:
    store.transition(job_id, JobState.RUNNING, owner="test-runner", lease_s=60)
    store.transition(job_id, JobState.SUCCEEDED, outputs=["file:///out/ukis-csmask.tif"])


def test_cancel(stub, spec: JobSpec, store: JobStore) -> None:
    submitted = stub.Submit(pb.SubmitRequest(spec=spec_to_proto(spec)), timeout=RPC_TIMEOUT).job
    assert submitted.state == pb.JOB_STATE_QUEUED
    cancelled = stub.Cancel(pb.CancelJobRequest(id=submitted.id), timeout=RPC_TIMEOUT)
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert cancelled.timings.HasField("finished")
    assert store.get(submitted.id).state is JobState.CANCELLED
    # cancelling again changes nothing
    assert (
        stub.Cancel(pb.CancelJobRequest(id=submitted.id), timeout=RPC_TIMEOUT).state == pb.JOB_STATE_CANCELLED
    )

    done, _ = store.create(spec)
    _succeed(store, done.id)
    err = _rpc_error(stub.Cancel, pb.CancelJobRequest(id=done.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert done.id in err.details()


# -- Watch ---------------------------------------------------------------------------------------


def test_watch_streams_until_the_final_state(stub, store: JobStore, spec: JobSpec) -> None:
    job, _ = store.create(spec)
    store.set_total(job.id, 4)
    first_seen = threading.Event()
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            assert first_seen.wait(30)
            store.transition(job.id, JobState.RUNNING, owner="test-runner", lease_s=60)
            for t in ("11/1/1", "11/1/2"):
                store.tile_done(job.id, t)
            store.publish(
                JobEvent(
                    job_id=job.id,
                    state=JobState.RUNNING,
                    progress=Progress(tiles_total=4, tiles_done=2),
                    tiles_per_second=1.5,
                    time=datetime.now(UTC),
                    message="halfway",
                )
            )
            time.sleep(0.3)  # the watcher is blocked in its poll: a quiet spell, then the end
            store.transition(job.id, JobState.SUCCEEDED, outputs=["file:///out/ukis-csmask.tif"])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    events = []
    for ev in stub.Watch(pb.WatchJobRequest(id=job.id), timeout=RPC_TIMEOUT):
        events.append(ev)
        first_seen.set()
    driver.join(30)
    assert not errors, errors

    states = [e.state for e in events]
    assert events[0].state == pb.JOB_STATE_QUEUED and events[0].job_id == job.id  # the current state first
    assert events[-1].state == pb.JOB_STATE_SUCCEEDED  # ... and it ends with the final one
    assert states.count(pb.JOB_STATE_SUCCEEDED) == 1
    assert pb.JOB_STATE_RUNNING in states
    assert states == sorted(states)  # queued -> running -> succeeded, in order
    halfway = [e for e in events if e.message == "halfway"]
    assert len(halfway) == 1
    assert (halfway[0].progress.tiles_done, halfway[0].progress.tiles_total, halfway[0].tiles_per_second) == (
        2,
        4,
        1.5,
    )
    assert all(e.HasField("time") and e.job_id == job.id for e in events)


def test_watch_a_finished_job_ends_at_once(stub, store: JobStore, spec: JobSpec) -> None:
    job, _ = store.create(spec)
    _succeed(store, job.id)
    t0 = time.monotonic()
    events = list(stub.Watch(pb.WatchJobRequest(id=job.id), timeout=RPC_TIMEOUT))
    assert time.monotonic() - t0 < 5
    assert [e.state for e in events] == [pb.JOB_STATE_SUCCEEDED]


class _CountingStore:
    """A JobStore that counts `events()` polls."""

    def __init__(self, store: JobStore):
        self._store = store
        self.polls = 0

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def events(self, *args, **kwargs):
        self.polls += 1
        return self._store.events(*args, **kwargs)


def test_watch_stops_polling_when_the_caller_leaves(
    store: JobStore, spec: JobSpec, model_store: Path
) -> None:
    counting = _CountingStore(store)
    job, _ = store.create(spec)  # queued, and nothing will happen to it
    for stub in _serve(JobService(counting, Settings(model_store=model_store))):
        call = stub.Watch(pb.WatchJobRequest(id=job.id), timeout=RPC_TIMEOUT)
        assert next(call).state == pb.JOB_STATE_QUEUED
        deadline = time.monotonic() + 10
        while counting.polls < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counting.polls >= 3
        call.cancel()
        time.sleep(0.5)  # at most one poll (100 ms) in flight
        polls = counting.polls
        time.sleep(0.6)
        assert counting.polls == polls, "the abandoned Watch kept polling"


# -- errors that are not the caller's ------------------------------------------------------------


def test_store_down_is_unavailable(spec: JobSpec, model_store: Path) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(
        host="127.0.0.1", port=1, decode_responses=True, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    dead = JobStore(client, "x:")
    for stub in _serve(JobService(dead, Settings(model_store=model_store))):
        err = _rpc_error(stub.Get, pb.GetJobRequest(id="abc"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_a_bug_is_internal_not_unknown(spec: JobSpec, store: JobStore, model_store: Path) -> None:
    class Broken(JobService):
        def get(self, job_id: str):
            raise RuntimeError("boom")

    for stub in _serve(Broken(store, Settings(model_store=model_store))):
        err = _rpc_error(stub.Get, pb.GetJobRequest(id="abc"))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "boom" not in err.details()  # internals stay in the server's log
