"""JobStore against the real Redis on 127.0.0.1:6379 (db 0); each test works under its own random
key prefix and deletes its keys afterwards."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from tilefm.errors import TileFMError
from tilefm.jobs.errors import IdempotencyConflict, InvalidPage, InvalidTransition, JobNotFound
from tilefm.jobs.models import TRANSITIONS, JobError, JobEvent, JobSpec, JobState, Progress
from tilefm.jobs.store import PRIORITY_WEIGHT, JobStore, queue_score

REDIS_URL = "redis://127.0.0.1:6379/0"


def _client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


@pytest.fixture
def prefix() -> Iterator[str]:
    client = _client()
    client.ping()  # the machine's Redis must be up: a missing server is a failure, not a skip
    p = f"tilefm-test:{uuid.uuid4().hex}:"
    yield p
    keys = list(client.scan_iter(match=p + "*", count=1000))
    if keys:
        client.delete(*keys)
    assert not list(client.scan_iter(match=p + "*"))
    client.close()


@pytest.fixture
def store(prefix: str) -> JobStore:
    return JobStore(_client(), prefix)


def spec(priority: int = 5, **kw) -> JobSpec:
    return JobSpec(
        scene={"s2": "/data/scene"},
        model="prithvi",
        output_prefix="file:///tmp/out/",
        priority=priority,
        **kw,
    )


def running(store: JobStore, **kw) -> str:
    job, _ = store.create(spec(**kw))
    return store.transition(job.id, JobState.RUNNING, owner="w", lease_s=30).id


# -- create / get / list ---------------------------------------------------------------------------


def test_create_and_get(store: JobStore):
    before = datetime.now(UTC)
    job, created = store.create(spec(labels={"team": "a"}))
    assert created
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert job.state is JobState.QUEUED
    assert job.spec.labels == {"team": "a"}
    assert job.progress == Progress()
    assert job.outputs == [] and job.error is None
    assert abs((job.timings.created - before).total_seconds()) < 5
    assert job.timings.started is None and job.timings.finished is None
    assert store.get(job.id) == job
    assert store.queue_depth() == 1
    assert store.counts_by_state() == {s: int(s is JobState.QUEUED) for s in JobState}
    # the tile count known at validation goes in with the record (no window with a 0 total)
    sized, _ = store.create(spec(), total=12)
    assert sized.progress.tiles_total == 12 == store.get(sized.id).progress.tiles_total
    with pytest.raises(ValueError):
        store.create(spec(), total=-1)


def test_list_paginates_newest_first(store: JobStore):
    made = [store.create(spec())[0] for _ in range(25)]  # many share a millisecond
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list(limit=10, cursor=cursor)
        pages += 1
        seen += page
        if cursor is None:
            break
        assert len(page) == 10
    assert pages == 3
    assert [j.id for j in seen] == [j.id for j in reversed(made)]  # each exactly once, newest first
    assert all(a.timings.created >= b.timings.created for a, b in itertools.pairwise(seen))
    # a page that ends exactly at the end has no next cursor
    page, cursor = store.list(limit=25)
    assert len(page) == 25 and cursor is None


def test_list_state_filter(store: JobStore):
    ids = [store.create(spec())[0].id for _ in range(6)]
    for job_id in ids[:2]:
        store.transition(job_id, JobState.RUNNING, owner="w", lease_s=30)
    store.transition(ids[2], JobState.CANCELLED)
    run, cur = store.list(state=JobState.RUNNING, limit=100, cursor=None)
    assert [j.id for j in run] == ids[1::-1] and cur is None
    assert [j.id for j in store.list(state="queued", limit=100)[0]] == ids[:2:-1]
    assert [j.id for j in store.list(state=JobState.CANCELLED, limit=1)[0]] == [ids[2]]
    assert store.list(state=JobState.SUCCEEDED, limit=10) == ([], None)
    # paging through a filtered index
    page1, cur = store.list(state=JobState.QUEUED, limit=2)
    page2, cur2 = store.list(state=JobState.QUEUED, limit=2, cursor=cur)
    assert [j.id for j in page1 + page2] == ids[:2:-1] and cur2 is None


@pytest.mark.parametrize("limit", [0, 101, -1])
def test_list_bad_limit(store: JobStore, limit: int):
    with pytest.raises(InvalidPage) as exc:
        store.list(limit=limit)
    assert exc.value.field == "limit"


def test_list_bad_cursor(store: JobStore):
    with pytest.raises(InvalidPage) as exc:
        store.list(limit=10, cursor="not!a*cursor")
    assert exc.value.field == "cursor" and isinstance(exc.value, TileFMError)


# -- idempotency -----------------------------------------------------------------------------------


def test_idempotency(store: JobStore, prefix: str):
    a, created_a = store.create(spec(), idempotency_key="k1", body_hash="h1")
    b, created_b = store.create(spec(), idempotency_key="k1", body_hash="h1")
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(IdempotencyConflict) as exc:
        store.create(spec(), idempotency_key="k1", body_hash="h2")
    assert exc.value.field == "Idempotency-Key" and exc.value.job_id == a.id
    # another key -> another job; no key -> always a new job
    c, created_c = store.create(spec(), idempotency_key="k2", body_hash="h1")
    assert created_c and c.id != a.id
    assert store.create(spec())[0].id != store.create(spec())[0].id
    # without a body hash the spec's own hash is used
    d, _ = store.create(spec(priority=1), idempotency_key="k3", body_hash=None)
    assert store.create(spec(priority=1), idempotency_key="k3", body_hash=None) == (d, False)
    with pytest.raises(IdempotencyConflict):
        store.create(spec(priority=2), idempotency_key="k3", body_hash=None)
    ttl = _client().ttl(prefix + "idem:k1")
    assert 24 * 3600 - 10 < ttl <= 24 * 3600
    assert store.counts_by_state()[JobState.QUEUED] == 5


# -- transitions -----------------------------------------------------------------------------------


def _job_in(store: JobStore, state: JobState) -> str:
    job_id = store.create(spec())[0].id
    if state is JobState.QUEUED:
        return job_id
    if state in (JobState.FAILED, JobState.CANCELLED):
        return store.transition(job_id, state).id
    store.transition(job_id, JobState.RUNNING, owner="w", lease_s=30)
    if state is JobState.SUCCEEDED:
        store.transition(job_id, JobState.SUCCEEDED)
    return job_id


PAIRS = [(a, b) for a in JobState for b in JobState]


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_matrix(store: JobStore, prefix: str, src: JobState, dst: JobState):
    job_id = _job_in(store, src)
    before = store.get(job_id)
    assert before.state is src
    extra = {"owner": "w2", "lease_s": 30} if dst is JobState.RUNNING else {}
    if dst not in TRANSITIONS[src]:
        with pytest.raises(InvalidTransition) as exc:
            store.transition(job_id, dst, **extra)
        assert exc.value.field == "state" and exc.value.current == src.value
        assert store.get(job_id) == before  # nothing changed
        return
    job = store.transition(job_id, dst, **extra)
    assert job.state is dst and store.get(job_id) == job
    counts = store.counts_by_state()
    assert counts[dst] == 1 and sum(counts.values()) == 1
    assert store.queue_depth() == int(dst is JobState.QUEUED)
    client = _client()
    assert client.zscore(f"{prefix}jobs:state:{dst.value}", job_id) is not None
    lease = store.lease_owner(job_id)
    assert lease == ("w2" if dst is JobState.RUNNING else None)
    if dst is JobState.RUNNING or src is JobState.RUNNING:
        assert job.timings.started is not None
    if dst.final:
        assert job.timings.finished is not None
    else:
        assert job.timings.finished is None
    assert int(client.hget(f"{prefix}job:{job_id}", "version")) > 1


def test_transition_expect_updates_and_errors(store: JobStore):
    job_id = running(store)
    with pytest.raises(InvalidTransition):
        store.transition(job_id, JobState.SUCCEEDED, expect={JobState.QUEUED})
    job = store.transition(
        job_id, "succeeded", expect={JobState.RUNNING}, outputs=["file:///tmp/out/prithvi.tif"]
    )
    assert job.outputs == ["file:///tmp/out/prithvi.tif"]
    failed = store.transition(
        store.create(spec())[0].id,
        JobState.FAILED,
        error=JobError(message="boom", field="scene", tiles=[{"tile": "1/2/3", "reason": "nan"}]),
    )
    assert failed.error is not None and failed.error.tiles[0].tile == "1/2/3"
    assert store.get(failed.id).error == failed.error
    with pytest.raises(TypeError):
        store.transition(failed.id, JobState.RUNNING)  # needs owner= and lease_s=
    with pytest.raises(TypeError):
        store.transition(failed.id, JobState.CANCELLED, colour="red")


def test_claim_next_priority_then_age(store: JobStore):
    assert store.claim_next("w", 30) is None
    low = store.create(spec(priority=0))[0].id
    mid1 = store.create(spec(priority=5))[0].id
    high = store.create(spec(priority=9))[0].id
    mid2 = store.create(spec(priority=5))[0].id
    order = [store.claim_next("w", 30).id for _ in range(4)]
    assert order == [high, mid1, mid2, low]
    assert store.claim_next("w", 30) is None
    assert queue_score(9, 10**12) < queue_score(5, 10**12) < queue_score(5, 10**12 + 1) < queue_score(0, 1)
    assert queue_score(0, 2**41) < 10 * PRIORITY_WEIGHT < 2**53
    job = store.get(high)
    assert job.state is JobState.RUNNING and job.timings.started is not None
    assert store.lease_owner(high) == "w"


# -- the race --------------------------------------------------------------------------------------


def _race_worker(prefix, ids, tiles_job, tiles, owner, barrier, results):
    store = JobStore(_client(), prefix)
    rng = random.Random(owner)
    barrier.wait()
    claimed = []
    for k in range(200):
        if k % 2 == 0:
            job = store.claim_next(owner, 30)
            if job is not None:
                claimed.append(job.id)
        else:
            try:
                store.transition(
                    ids[k // 2], JobState.RUNNING, expect={JobState.QUEUED}, owner=owner, lease_s=30
                )
                claimed.append(ids[k // 2])
            except InvalidTransition:
                pass
    barrier.wait()
    finished = []
    for job_id in ids:
        try:
            store.transition(job_id, JobState.SUCCEEDED, expect={JobState.RUNNING})
            finished.append(job_id)
        except InvalidTransition:
            pass
    barrier.wait()
    order = list(tiles)
    rng.shuffle(order)
    new = [t for t in order if store.tile_done(tiles_job, t)]
    results.put((owner, claimed, finished, new))


def test_two_processes_race(store: JobStore):
    ids = [store.create(spec())[0].id for _ in range(150)]
    tiles_job = running(store)
    store.set_total(tiles_job, 500)
    tiles = [f"12/{i // 25}/{i % 25}" for i in range(500)]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_race_worker, args=(store.prefix, ids, tiles_job, tiles, f"p{i}", barrier, results)
        )
        for i in range(2)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = [j for _, c, _, _ in out for j in c]
    finished = [j for _, _, f, _ in out for j in f]
    new_tiles = [t for _, _, _, n in out for t in n]
    assert sorted(claimed) == sorted(ids)  # every job claimed, none twice
    assert sorted(finished) == sorted(ids)  # every job finished once
    assert all(c for _, c, _, _ in out)  # both processes won some
    assert sorted(new_tiles) == sorted(tiles)  # each tile counted once
    assert store.tiles_done(tiles_job) == set(tiles)
    assert store.get(tiles_job).progress == Progress(tiles_total=500, tiles_done=500, tiles_failed=0)
    counts = store.counts_by_state()
    assert counts[JobState.SUCCEEDED] == 150 and counts[JobState.QUEUED] == 0 and store.queue_depth() == 0
    # one event per move: queued, running, succeeded
    for job_id in ids[:20]:
        assert [e.state for _, e in store.events(job_id, block_ms=0)] == [
            JobState.QUEUED,
            JobState.RUNNING,
            JobState.SUCCEEDED,
        ]


# -- leases ----------------------------------------------------------------------------------------


def test_lease_expiry_and_requeue(store: JobStore):
    job_id = store.create(spec())[0].id
    other = store.create(spec())[0].id
    claimed = store.claim_next("w1", lease_s=0.5)
    assert claimed.id == job_id
    assert store.claim_next("w2", lease_s=30).id == other
    store.set_total(job_id, 4)
    assert store.tile_done(job_id, "1/0/0") and store.tile_done(job_id, "1/0/1")
    assert not store.tile_done(job_id, "1/0/0")
    assert store.renew_lease(job_id, "w1", 0.5)
    assert not store.renew_lease(job_id, "intruder", 30)
    assert store.expired_running() == []
    time.sleep(0.7)
    assert store.expired_running() == [job_id]
    assert not store.renew_lease(job_id, "w1", 30)  # too late: the owner must stop
    job = store.requeue(job_id)
    assert job.state is JobState.QUEUED and store.lease_owner(job_id) is None
    assert job.progress == Progress(tiles_total=4, tiles_done=2, tiles_failed=0)
    assert store.tiles_done(job_id) == {"1/0/0", "1/0/1"}
    assert store.expired_running() == []
    with pytest.raises(InvalidTransition):
        store.requeue(job_id)  # not running any more
    again = store.claim_next("w3", 30)
    assert again.id == job_id and again.progress.tiles_done == 2
    assert again.timings.started == claimed.timings.started  # the first start is kept


def test_tiles_failed_and_progress(store: JobStore):
    job_id = running(store)
    store.set_total(job_id, 3)
    store.tile_failed(job_id, "1/1/1", "read error")
    store.tile_failed(job_id, "1/1/2", "nan")
    assert store.tiles_failed(job_id) == {"1/1/1": "read error", "1/1/2": "nan"}
    assert store.tile_done(job_id, "1/1/2")  # a retry succeeded: no longer failed
    store.tile_failed(job_id, "1/1/2", "late")  # ignored: already done
    assert store.get(job_id).progress == Progress(tiles_total=3, tiles_done=1, tiles_failed=1)
    with pytest.raises(ValueError):
        store.set_total(job_id, -1)


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel(store: JobStore):
    queued = store.create(spec())[0].id
    job = store.request_cancel(queued)
    assert job.state is JobState.CANCELLED and job.timings.finished is not None
    assert store.queue_depth() == 0 and store.claim_next("w", 30) is None
    assert store.request_cancel(queued).state is JobState.CANCELLED  # idempotent

    run = running(store)
    job = store.request_cancel(run)
    assert job.state is JobState.RUNNING and store.cancel_requested(run)
    assert store.request_cancel(run).state is JobState.RUNNING
    done = store.transition(run, JobState.CANCELLED, expect={JobState.RUNNING})  # the runner stops
    assert done.state is JobState.CANCELLED and not store.cancel_requested(run)

    # a cancel requested while running wins over a requeue after the lease is lost
    run2 = running(store)
    store.request_cancel(run2)
    assert store.requeue(run2).state is JobState.CANCELLED
    assert store.queue_depth() == 0

    finished = _job_in(store, JobState.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        store.request_cancel(finished)
    assert not store.cancel_requested(finished)


# -- events ----------------------------------------------------------------------------------------


def test_events_round_trip(store: JobStore):
    job_id = store.create(spec())[0].id
    store.transition(job_id, JobState.RUNNING, owner="w", lease_s=30)
    store.set_total(job_id, 10)
    store.tile_done(job_id, "1/0/0")
    event = JobEvent(
        job_id=job_id,
        state=JobState.RUNNING,
        progress=Progress(tiles_total=10, tiles_done=1),
        tiles_per_second=2.5,
        time=datetime.now(UTC),
        message="tile 1/0/0",
    )
    sid = store.publish(event)
    got = store.events(job_id, "0", block_ms=0)
    assert [e.state for _, e in got] == [JobState.QUEUED, JobState.RUNNING, JobState.RUNNING]
    assert got[-1] == (sid, event)
    assert got[1][1].progress.tiles_total == 0 and got[1][1].message == "running"
    # resume after the last id: nothing new; then a non-blocking read
    assert store.events(job_id, sid, block_ms=0) == []
    # blocking read that times out returns []
    t0 = time.monotonic()
    assert store.events(job_id, sid, block_ms=200) == []
    assert 0.15 < time.monotonic() - t0 < 2
    # blocking read woken by a write from another thread
    timer = threading.Timer(0.1, lambda: store.transition(job_id, JobState.SUCCEEDED))
    timer.start()
    t0 = time.monotonic()
    woke = store.events(job_id, sid, block_ms=3000)
    timer.join()
    assert time.monotonic() - t0 < 2
    assert [e.state for _, e in woke] == [JobState.SUCCEEDED]
    assert woke[0][1].progress == Progress(tiles_total=10, tiles_done=1)
    # a block longer than the client's socket timeout would end in a TimeoutError: refused up front
    short = JobStore(redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=1), store.prefix)
    with pytest.raises(ValueError):
        short.events(job_id, sid, block_ms=1000)


def test_events_are_capped(store: JobStore, prefix: str):
    job_id = store.create(spec())[0].id
    ev = JobEvent(job_id=job_id, state=JobState.QUEUED, progress=Progress(), time=datetime.now(UTC))
    pipe_store = JobStore(_client(), prefix)
    for _ in range(2500):
        pipe_store.publish(ev)
    assert _client().xlen(f"{prefix}job:{job_id}:events") < 1200


# -- unknown ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("nope"),
        lambda s: s.transition("nope", JobState.CANCELLED),
        lambda s: s.requeue("nope"),
        lambda s: s.request_cancel("nope"),
        lambda s: s.tile_done("nope", "1/0/0"),
        lambda s: s.tiles_done("nope"),
        lambda s: s.tile_failed("nope", "1/0/0", "x"),
        lambda s: s.tiles_failed("nope"),
        lambda s: s.set_total("nope", 3),
        lambda s: s.events("nope", block_ms=0),
    ],
    ids=[
        "get",
        "transition",
        "requeue",
        "cancel",
        "tile_done",
        "tiles_done",
        "tile_failed",
        "tiles_failed",
        "set_total",
        "events",
    ],
)
def test_job_not_found(store: JobStore, call):
    with pytest.raises(JobNotFound) as exc:
        call(store)
    assert exc.value.field == "id" and exc.value.job_id == "nope"
    assert not store.renew_lease("nope", "w", 1)
    assert store.counts_by_state() == {s: 0 for s in JobState} and store.queue_depth() == 0


def test_create_async_is_create_on_an_event_loop(store: JobStore) -> None:
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    async def go():
        client = AsyncRedis.from_url(REDIS_URL, decode_responses=True)
        try:
            a, made_a = await store.create_async(client, spec(), idempotency_key="ka", body_hash="h", total=7)
            b, made_b = await store.create_async(client, spec(), idempotency_key="ka", body_hash="h", total=7)
            with pytest.raises(IdempotencyConflict):
                await store.create_async(client, spec(), idempotency_key="ka", body_hash="other")
            await client.script_flush()  # a restarted Redis has no scripts: the body is sent again
            c, made_c = await store.create_async(client, spec(), total=2)
            return a, made_a, b, made_b, c, made_c
        finally:
            await client.aclose()

    a, made_a, b, made_b, c, made_c = asyncio.run(go())
    assert made_a and not made_b and made_c and a.id == b.id != c.id
    assert store.get(a.id) == a and a.progress.tiles_total == 7 and c.progress.tiles_total == 2
    assert store.queue_depth() == 2
    assert store.create(spec())[1]  # and the sync path still finds (reloads) its script
