"""The scheduler: a Ray driver that runs queued jobs, several at once, on shared encoder actors.

Why a long-running driver process rather than the Ray Jobs API: tiles of many jobs share the same
encoder actors (a model loaded once per GPU, not once per job), batches are interleaved
round-robin across running jobs so a big job cannot starve a small one, and per-tile progress
goes to Redis as each tile lands.

Each running job has its own stitching thread (`tilefm.jobs.stitching`), which runs the same
`publish` as `tilefm run`: tile outputs stream into the job's mosaic (and its COG) as their
batches arrive, through a bounded queue, so the stitching overlaps the encoding and memory
follows the tiles in flight. The driver holds no state that matters: every finished tile's
output is also stored beside the job's output (`tilefm.jobs.checkpoints`, never read back on the
way) and recorded in Redis, and the job's lease expires if the driver dies, so another (or the
restarted) scheduler re-queues the job and resumes it without redoing finished tiles: their
checkpoints are read back (in parallel) into the new stitcher first.

Redis going away (a restart, a failover) stops nothing for good: the loop waits for it with a
capped backoff and carries on with the jobs it holds, and part writes finished meanwhile wait
to be recorded rather than failing their job. A lease that ran out while Redis was away is
dropped like any lost lease; the job is re-queued and resumed from its recorded tiles.

Why one module (~600 lines): the `Scheduler` is one loop, and its steps (claim, dispatch, collect,
finish, cancel, fail, lease renewal, encoder placement) act on the same jobs and encoder pools;
the parts that run off the loop have their own modules (stitching, checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import numpy as np

from tilefm import metrics
from tilefm.engine.pipeline import Prepared, batches, default_batch, publish
from tilefm.engine.runtime import EncoderPool, WorkerSpec, connect, remote_reader, start_encoders, unplaceable
from tilefm.errors import TileFMError
from tilefm.grid import Tile
from tilefm.jobs.checkpoints import Checkpoints, Stopped, part_dtype
from tilefm.jobs.errors import InvalidTransition
from tilefm.jobs.models import Job, JobError, JobEvent, JobState, TileFailure
from tilefm.jobs.service import output_uri, prepare_job
from tilefm.jobs.stitching import STOP_S, Aborted, JobStitcher
from tilefm.jobs.store import REDIS_UNAVAILABLE, JobStore
from tilefm.settings import Settings
from tilefm.values import Encoding, TileOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

#: waits between tries while Redis is unreachable: doubling from the first to the last
REDIS_BACKOFF_S = (0.5, 10.0)


def _backoff(delay: float) -> float:
    return min(max(2 * delay, REDIS_BACKOFF_S[0]), REDIS_BACKOFF_S[1])


@dataclass
class _Batch:
    job_id: str
    tiles: list[Tile]
    attempt: int = 0


@dataclass
class _Active:
    job: Job
    prep: Prepared
    encoding: Encoding
    pending: deque[_Batch]
    checkpoints: Checkpoints
    in_flight: int = 0
    writes: list[Future[Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    done_at_start: int = 0
    done: int = 0
    last_event: float = 0.0
    #: tiles recorded done before this scheduler took the job: read back into the stitcher first
    resumed: list[Tile] = field(default_factory=list)
    #: the job's stitching thread, started with the job
    stitcher: JobStitcher = field(init=False)
    #: the backend and precision the encoder actors run (GPU actors resolve `auto` themselves)
    backend: str = ""
    precision: str = ""
    #: the job's scene in Ray's object store, put there once for all its read tasks
    scene_ref: Any = None

    @property
    def part_dtype(self) -> np.dtype:
        return part_dtype(self.encoding)


class Scheduler:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        *,
        owner: str | None = None,
        max_jobs: int = 4,
        lease_s: float = 30.0,
        batch_size: int | None = None,
        in_flight_per_actor: int | None = None,
        max_attempts: int = 3,
    ):
        self.store = store
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.max_jobs = max_jobs
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.in_flight_per_actor = in_flight_per_actor
        self.max_attempts = max_attempts
        self.active: dict[str, _Active] = {}
        self.pools: dict[tuple[str, ...], EncoderPool] = {}
        self.refs: dict[Any, tuple[_Batch, Any]] = {}
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tilefm-parts")
        #: the `ray` module once connected (`connect`); Ray ships no type information
        self.ray: Any = None
        self._rr: deque[str] = deque()
        self._last_renew = 0.0
        #: since when no live node could hold each pool's actors (`_check_placement`)
        self._unplaceable: dict[tuple[str, ...], float] = {}
        self._last_placement_check = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- main loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, *, idle_sleep: float = 0.5) -> None:
        stop = self._stop = stop or threading.Event()
        self.ray = connect(self.settings)
        self._read = remote_reader(self.ray, self.settings)
        log.info("scheduler %s started", self.owner)
        delay = 0.0
        try:
            while not stop.is_set():
                try:
                    busy = self.step()
                except REDIS_UNAVAILABLE as e:  # a step stops at its first Redis call and is safe to redo
                    delay = _backoff(delay)
                    log.warning(
                        "redis unreachable (%s); %d jobs held, retrying in %.1f s",
                        _reason(e),
                        len(self.active),
                        delay,
                    )
                    stop.wait(delay)
                    continue
                if delay:
                    log.info("redis reachable again; carrying on with %d jobs", len(self.active))
                    delay = 0.0
                if not busy:
                    stop.wait(idle_sleep)
        finally:
            self.shutdown()

    def step(self) -> bool:
        """One pass: recover, claim, check cancels, dispatch, collect, finish. True if anything ran."""
        for job_id in self.store.expired_running():
            if job_id not in self.active:
                log.warning("job %s lost its scheduler; re-queued", job_id)
                self.store.requeue(job_id)
        self._renew_leases()
        while len(self.active) < self.max_jobs:
            job = self.store.claim_next(self.owner, self.lease_s)
            if job is None:
                break
            if job.id in self.active:  # running here already: Redis lost the first claim in a restart
                continue
            self._start(job)
        for a in list(self.active.values()):
            self._check_cancel(a)
        self._dispatch()
        if self.refs:
            self._collect(timeout=0.2)
        elif self.active:  # waiting on stitchers or part writes only: no spinning against them
            self._stop.wait(0.05)
        self._check_placement()
        for a in list(self.active.values()):
            self._maybe_finish(a)
        return bool(self.active)

    def shutdown(self) -> None:
        self._stop.set()  # worker threads waiting for Redis give up
        for a in self.active.values():  # their leases run out; another scheduler resumes them
            a.stitcher.abort()
        self.io.shutdown(wait=True)
        for a in self.active.values():
            a.stitcher.join()
        if self.ray is not None:
            for pool in self.pools.values():
                for actor in pool.actors:
                    self.ray.kill(actor)
        self.pools.clear()

    # -- jobs ----------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        try:
            prep = prepare_job(job, self.settings)  # its own key, allowlists checked again
        except TileFMError as e:
            self._fail(job, JobError(message=str(e), field=e.field))
            return
        done = self.store.tiles_done(job.id)
        todo = [t for t in prep.plan.tiles if str(t) not in done]
        resumed = [t for t in prep.plan.tiles if str(t) in done]
        self.store.set_total(job.id, len(prep.plan.tiles))
        try:
            pool = self._pool(prep)  # load the model before the first batch (on GPUs: its batch size)
        except TileFMError as e:  # no node took the encoders in time, or the model did not load there
            self._fail(job, JobError(message=str(e), field=e.field))
            return
        a = _Active(
            job=job,
            prep=prep,
            encoding=Encoding.for_card(prep.card, job.spec.dtype),
            pending=deque(
                _Batch(job.id, b)
                for b in batches(todo, self.batch_size or pool.batch_size or default_batch(prep.card))
            ),
            done_at_start=len(done),
            done=len(done),
            backend=pool.backend,
            precision=pool.precision(self._worker(prep)),
            resumed=resumed,
            checkpoints=Checkpoints(job, self.settings),
        )
        a.stitcher = JobStitcher(
            f"tilefm-stitch-{job.id[:8]}",
            partial(self._stitch, a),
            first=partial(a.checkpoints.read_back, resumed),
        ).start()
        self.active[job.id] = a
        self._rr.append(job.id)
        self._event(a, f"running: {len(todo)} of {len(prep.plan.tiles)} tiles to do")

    @staticmethod
    def _worker(prep: Prepared) -> WorkerSpec:
        return WorkerSpec(
            card=prep.card,
            backend=prep.backend,
            weights=prep.weights,
            precision=prep.precision,
            out_dtype=prep.spec.dtype,
        )

    @staticmethod
    def _pool_key(prep: Prepared) -> tuple[str, str, str, str]:
        """Jobs share encoders that run the same model the same way and hand back the dtype
        they store (a GPU rounds float16 outputs itself)."""
        return (prep.card.name, prep.backend, prep.precision, prep.spec.dtype or prep.card.output.dtype)

    def _pool(self, prep: Prepared) -> EncoderPool:
        key = self._pool_key(prep)
        if key not in self.pools:
            in_use = {self._pool_key(a.prep) for a in self.active.values()}
            for idle in [k for k in self.pools if k not in in_use]:  # free the node for this model
                for actor in self.pools.pop(idle).actors:
                    self.ray.kill(actor)
            self.pools[key] = start_encoders(
                self.ray, self._worker(prep), self.settings, requested=prep.spec.backend
            )
            metrics.ray_actors.set(sum(len(p.actors) for p in self.pools.values()))
        return self.pools[key]

    def _check_placement(self, every_s: float = 2.0) -> None:
        """Fail the jobs of a pool whose actors no live node can hold (their node left the cluster
        and no other has what they reserve: TILEFM_ENCODER_RESOURCES, GPUs) once that has lasted
        `encoder_start_timeout_s` (an autoscaler's time to add a node): Ray would keep their
        batches waiting for a node forever."""
        now = time.monotonic()
        if now - self._last_placement_check < every_s:
            return
        self._last_placement_check = now
        busy = {act for _, act in self.refs.values()}
        for key, pool in list(self.pools.items()):
            why = (
                unplaceable(self.ray, self.settings, pool.placement)
                if any(act in busy for act in pool.actors)
                else None
            )
            if why is None:
                self._unplaceable.pop(key, None)
                continue
            since = self._unplaceable.setdefault(key, now)
            if now - since < self.settings.encoder_start_timeout_s:
                if since == now:
                    log.warning(
                        "encoders for %s: %s; their jobs fail in %g s unless one joins",
                        key[0],
                        why,
                        self.settings.encoder_start_timeout_s,
                    )
                continue
            message = (
                f"encoder actors for {key[0]!r} lost their node: {why} (for {now - since:.0f} s; see "
                "TILEFM_ENCODER_RESOURCES)"
            )
            for a in [
                a for a in self.active.values() if self._pool_key(a.prep) == key and not a.stitcher.closed
            ]:
                self._fail(a.job, JobError(message=message, field="backend"), a)
                self._forget(a.job.id)
            for actor in self.pools.pop(key).actors:
                self.ray.kill(actor)
            self._unplaceable.pop(key, None)
            metrics.ray_actors.set(sum(len(p.actors) for p in self.pools.values()))

    def _dispatch(self) -> None:
        """Round-robin over running jobs, a batch at a time, while actors have room."""
        for _ in range(len(self._rr)):
            job_id = self._rr[0]
            self._rr.rotate(-1)
            a = self.active.get(job_id)
            if a is None or not a.pending or a.stitcher.closed or a.stitcher.held:  # held: its queue is full
                continue
            pool = self._pool(a.prep)
            actors = pool.actors
            limit = (self.in_flight_per_actor or pool.placement.in_flight) * len(actors)
            load = sum(1 for b, act in self.refs.values() if act in actors)
            if load >= limit:
                continue
            batch = a.pending.popleft()
            actor = actors[load % len(actors)]
            inputs = self._read.remote(self._scene_ref(a), a.prep.card, batch.tiles, a.prep.card.context.halo)
            self.refs[actor.encode.remote(inputs)] = (batch, actor)
            a.in_flight += 1

    def _scene_ref(self, a: _Active) -> Any:
        if a.scene_ref is None:
            a.scene_ref = self.ray.put(a.prep.scene)
        return a.scene_ref

    def _collect(self, timeout: float) -> None:
        if not self.refs:
            return
        done, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        for ref in done:
            batch, _actor = self.refs.pop(ref)
            a = self.active.get(batch.job_id)
            if a is None or a.stitcher.aborted.is_set():
                continue
            a.in_flight -= 1
            try:
                outputs = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a task or actor that failed past Ray's retries: any type
                batch.attempt += 1
                if batch.attempt < self.max_attempts:
                    log.warning("job %s: batch %s failed (%s); retrying", a.job.id, batch.tiles, e)
                    a.pending.appendleft(batch)
                else:
                    a.failed.update(
                        (str(t), _reason(e)) for t in batch.tiles
                    )  # before Redis, which may be away
                    for t in batch.tiles:
                        metrics.tiles_failed.labels(a.prep.card.name, a.prep.backend).inc()
                        self.store.tile_failed(a.job.id, str(t), _reason(e))
                continue
            a.stitcher.offer(outputs)
            # the checkpoints, a tile at a time: the io threads store a batch's tiles side by side
            a.writes += [self.io.submit(self._store_parts, a, [out]) for out in outputs]

    def _store_parts(self, a: _Active, outputs: list[TileOutput]) -> None:
        labels = (a.prep.card.name, a.prep.backend)
        for out in outputs:
            metrics.stage_seconds.labels("read").observe(out.read_s)
            metrics.stage_seconds.labels("encode").observe(out.encode_s)
            t0 = time.perf_counter()
            a.checkpoints.write(out, a.part_dtype)
            metrics.stage_seconds.labels("upload").observe(time.perf_counter() - t0)
            if self._until_redis(self.store.tile_done, a.job.id, str(out.tile)):
                with self._lock:
                    a.done += 1
                metrics.tiles_processed.labels(*labels).inc()
        now = time.monotonic()
        if now - a.last_event > 0.5:
            self._event(a)

    def _maybe_finish(self, a: _Active) -> None:
        """A job leaves `active` only once its final state is recorded: a Redis error on the way
        leaves it here for the next step to try again."""
        st = a.stitcher.done
        if st.done():
            exc = st.exception()
            if exc is not None:
                self._fail(a.job, JobError(message=f"finishing the output failed: {_reason(exc)}"), a)
                self._forget(a.job.id)
            elif st.result():
                self._forget(a.job.id)
            # else withdrawn by a cancel: the next step's cancel check records it and cleans up
            return
        a.stitcher.feed()
        a.writes = [w for w in a.writes if not w.done() or w.exception() is not None]
        errors = [e for w in a.writes if w.done() and (e := w.exception()) is not None]
        if errors:
            self._fail(a.job, JobError(message=f"storing tiles failed: {_reason(errors[0])}"), a)
            self._forget(a.job.id)
            return
        if a.stitcher.closed or a.pending or a.in_flight or a.writes:
            return
        if a.failed:
            tiles = [TileFailure(tile=t, reason=r) for t, r in sorted(a.failed.items())]
            self._fail(
                a.job,
                JobError(
                    message=f"{len(tiles)} tiles failed after {self.max_attempts} attempts", tiles=tiles
                ),
                a,
            )
            self._forget(a.job.id)
            return
        a.stitcher.close()  # every tile stored and recorded, and held or queued for the stitcher

    def _forget(self, job_id: str) -> None:
        a = self.active.pop(job_id, None)
        if a is not None:
            a.stitcher.abort()  # no-op once its stitcher is done
        self._rr = deque(j for j in self._rr if j != job_id)

    def _stitch(self, a: _Active, outputs: Iterator[TileOutput], stitcher: JobStitcher) -> bool:
        """Stitch the job's tiles as they arrive into the COG (`publish`, as `tilefm run` does),
        publish it once every tile is in, record the job done, then drop the checkpoints. False
        where it stopped without output (a cancel, or the stitcher aborted)."""
        job, prep = a.job, a.prep
        out = output_uri(job.spec, job.id)

        def checked() -> Iterator[TileOutput]:
            yield from outputs
            self._check_recorded(a)  # before anything is put

        timings: dict[str, float] = {}
        ran = replace(
            prep, backend=a.backend, precision=a.precision
        )  # what the encoders ran, as a run's output says
        try:
            stac_uri = publish(
                ran,
                a.encoding,
                checked(),
                out,
                self.settings,
                extra_tags={"job": job.id},
                owner=job.id,
                proceed=lambda: (
                    not stitcher.aborted.is_set()
                    and not self._until_redis(self.store.cancel_requested, job.id)
                ),
                timings=timings,
            )
        except (Aborted, Stopped):
            return False
        except Exception:
            if stitcher.aborted.is_set():  # whatever stopping it raised on the way out
                return False
            raise
        # the stitcher's own time: what it spent waiting for tiles left out
        metrics.stage_seconds.labels("stitch").observe(
            max(timings["tiles_s"] - stitcher.waited_s, 0.0) + timings["cog_s"]
        )
        if stac_uri is None:
            return False  # cancelled while stitching: the cancel path cleans up
        metrics.stage_seconds.labels("upload").observe(timings["upload_s"])
        try:
            self._until_redis(self.store.transition, job.id, JobState.SUCCEEDED, outputs=[out, stac_uri])
        except InvalidTransition:
            if self._until_redis(self.store.get, job.id).state is not JobState.SUCCEEDED:
                raise
            # an earlier try was recorded, its reply lost with the connection
        a.checkpoints.delete()
        return True

    def _check_recorded(self, a: _Active) -> None:
        """Every tile recorded in Redis, or raise: run once every tile is in the stitcher."""
        job, prep = a.job, a.prep
        done = self._until_redis(self.store.tiles_done, job.id)
        if unrecorded := [t for t in prep.plan.tiles if str(t) not in done and a.checkpoints.exists(t)]:
            # stored, but the record was among the last writes of a Redis that restarted without
            # them (appendfsync everysec): the part is what counts
            log.warning(
                "job %s: %d stored tiles were not recorded in Redis; recording them", job.id, len(unrecorded)
            )
            for t in unrecorded:
                self._until_redis(self.store.tile_done, job.id, str(t))
            done |= {str(t) for t in unrecorded}
        missing = [str(t) for t in prep.plan.tiles if str(t) not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} tiles not recorded as done: {', '.join(missing[:5])}")

    def _check_cancel(self, a: _Active) -> None:
        if not self.store.cancel_requested(a.job.id):
            return
        a.pending.clear()
        for ref, (batch, _) in list(self.refs.items()):
            if batch.job_id == a.job.id:
                self.ray.cancel(ref)
                self.refs.pop(ref)
        a.stitcher.abort()
        if not a.stitcher.done.done():
            return  # wait for the stitcher to let go (at its next tile), or to finish publishing
        for w in a.writes:
            w.exception()  # let in-flight part writes land before deleting them
        with contextlib.suppress(TileFMError):  # already final
            self.store.transition(a.job.id, JobState.CANCELLED)
        self._forget(a.job.id)
        a.checkpoints.delete()

    def _fail(self, job: Job, error: JobError, a: _Active | None = None) -> None:
        """Record the failure, then remove the job's parts: a failed job is never resumed. Its
        running work (`a`) stops first, so that no part lands after the clean-up."""
        if a is not None:
            self._stop_work(a)
        log.error("job %s failed: %s", job.id, error.message)
        try:
            self.store.transition(job.id, JobState.FAILED, error=error)
        except InvalidTransition as e:  # final already (cancelled meanwhile): its parts go all the same
            log.warning("job %s: not marked failed, it is already %s", job.id, e.current)
        Checkpoints(job, self.settings).delete()

    def _stop_work(self, a: _Active) -> None:
        """Drop a job's queued batches and cancel its running ones, stop its stitcher, then wait
        for its part writes and for the stitcher to let go."""
        a.pending.clear()
        for ref, (batch, _) in list(self.refs.items()):
            if batch.job_id == a.job.id:
                self.ray.cancel(ref)
                self.refs.pop(ref)
        a.stitcher.abort()
        for w in a.writes:
            w.exception()
        if not a.stitcher.join():
            log.warning("job %s: its stitcher did not stop within %g s", a.job.id, STOP_S)

    def _until_redis(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call`, retried while Redis is unreachable, for the worker threads: what they record
        (a stored part, a finished output) is done work that an outage must not throw away.
        Gives up only when the scheduler stops."""
        delay = 0.0
        while True:
            try:
                return call(*args, **kwargs)
            except REDIS_UNAVAILABLE as e:
                if self._stop.is_set():
                    raise
                delay = _backoff(delay)
                log.warning(
                    "redis unreachable (%s); retrying %s in %.1f s",
                    _reason(e),
                    getattr(call, "__name__", "a call"),
                    delay,
                )
                self._stop.wait(delay)

    def _event(self, a: _Active, message: str = "") -> None:
        """A progress event (state changes are published by the store itself)."""
        a.last_event = time.monotonic()
        elapsed = max(time.monotonic() - a.started, 1e-6)
        rate = (a.done - a.done_at_start) / elapsed
        try:
            job = self.store.get(a.job.id)
            self.store.publish(
                JobEvent(
                    job_id=a.job.id,
                    state=job.state,
                    progress=job.progress,
                    tiles_per_second=round(rate, 3),
                    time=_now(),
                    message=message,
                )
            )
        except REDIS_UNAVAILABLE as e:  # progress only: the next event carries it
            log.info("job %s: progress event not sent (%s)", a.job.id, _reason(e))

    def _renew_leases(self) -> None:
        now = time.monotonic()
        if now - self._last_renew < self.lease_s / 3:
            return
        for job_id in list(self.active):
            if not self.store.renew_lease(job_id, self.owner, self.lease_s):
                log.warning("job %s: lease lost; dropping it here", job_id)
                self._forget(job_id)
        self._last_renew = (
            now  # only once every lease is renewed: after a Redis error, the next step tries again
        )


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]


def _now() -> datetime:
    return datetime.now(UTC)
