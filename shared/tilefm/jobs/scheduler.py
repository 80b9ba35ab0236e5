"""The scheduler: a Ray driver that runs queued jobs, several at once, on shared encoder actors.

Why a long-running driver process rather than the Ray Jobs API: tiles of many jobs share the same
encoder actors (a model loaded once per GPU, not once per job), batches are interleaved
round-robin across running jobs so a big job cannot starve a small one, and per-tile progress
goes to Redis as each tile lands. The driver holds no state that matters: every finished tile's
contribution is stored beside the job's output (`.parts/`) and recorded in Redis, and the job's
lease expires if the driver dies, so another (or the restarted) scheduler re-queues the job and
resumes it without redoing finished tiles.

Redis going away (a restart, a failover) stops nothing for good: the loop waits for it with a
capped backoff and carries on with the jobs it holds, and part writes finished meanwhile wait
to be recorded rather than failing their job. A lease that ran out while Redis was away is
dropped like any lost lease; the job is re-queued and resumed from its recorded tiles.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from tilefm import metrics
from tilefm.engine.pipeline import Prepared, batches, default_batch, publish
from tilefm.engine.runtime import EncoderPool, WorkerSpec, connect, remote_reader, start_encoders, unplaceable
from tilefm.errors import TileFMError
from tilefm.grid import Tile
from tilefm.jobs.errors import InvalidTransition
from tilefm.jobs.models import Job, JobError, JobEvent, JobState, TileFailure
from tilefm.jobs.service import output_uri, prepare_job
from tilefm.jobs.store import REDIS_UNAVAILABLE, JobStore
from tilefm.settings import Settings
from tilefm.storage import FileLocation, S3Storage, parse_uri, storage_for
from tilefm.values import Encoding, TileOutput

log = logging.getLogger(__name__)

T = TypeVar("T")

#: waits between tries while Redis is unreachable: doubling from the first to the last
REDIS_BACKOFF_S = (0.5, 10.0)


def _backoff(delay: float) -> float:
    return min(max(2 * delay, REDIS_BACKOFF_S[0]), REDIS_BACKOFF_S[1])


def parts_prefix(job: Job) -> str:
    """Scratch space for a job's finished tiles, in the job's own output folder."""
    return output_uri(job.spec, job.id).rsplit("/", 1)[0] + f"/.parts-{job.id}/"


def part_uri(job: Job, tile: Tile) -> str:
    return f"{parts_prefix(job)}{tile.z}-{tile.x}-{tile.y}.npz"


def encode_part(out: TileOutput, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, values=out.values.astype(dtype, copy=False), weight=out.weight, halo=np.int32(out.halo))
    return buf.getvalue()


def decode_part(data: bytes, tile: Tile) -> TileOutput:
    with np.load(io.BytesIO(data)) as z:
        return TileOutput(
            tile=tile, halo=int(z["halo"]), values=z["values"].astype(np.float32), weight=z["weight"]
        )


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
    in_flight: int = 0
    writes: list[Future[Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    done_at_start: int = 0
    done: int = 0
    finishing: Future[Any] | None = None
    last_event: float = 0.0
    #: the backend and precision the encoder actors run (GPU actors resolve `auto` themselves)
    backend: str = ""
    precision: str = ""
    #: the job's scene in Ray's object store, put there once for all its read tasks
    scene_ref: Any = None

    @property
    def part_dtype(self) -> np.dtype:
        return (
            np.dtype(np.float16)
            if self.encoding.nbits == 16 or self.encoding.dtype == "int8"
            else np.dtype(np.float32)
        )


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
        self._collect(timeout=0.2 if self.refs else 0)
        self._check_placement()
        for a in list(self.active.values()):
            self._maybe_finish(a)
        return bool(self.active)

    def shutdown(self) -> None:
        self._stop.set()  # worker threads waiting for Redis give up
        self.io.shutdown(wait=True)
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
        )
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
                a for a in self.active.values() if self._pool_key(a.prep) == key and a.finishing is None
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
            if a is None or not a.pending or a.finishing is not None:
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
            if a is None:
                continue
            a.in_flight -= 1
            try:
                outputs = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a task or actor that failed past Ray's retries: any type
                batch.attempt += 1
                if batch.attempt < self.max_attempts and a.finishing is None:
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
            a.writes.append(self.io.submit(self._store_parts, a, outputs))

    def _store_parts(self, a: _Active, outputs: list[TileOutput]) -> None:
        store = storage_for(output_uri(a.job.spec, a.job.id), self.settings)  # parts live beside the output
        labels = (a.prep.card.name, a.prep.backend)
        for out in outputs:
            metrics.stage_seconds.labels("read").observe(out.read_s)
            metrics.stage_seconds.labels("encode").observe(out.encode_s)
            t0 = time.perf_counter()
            store.write_bytes(part_uri(a.job, out.tile), encode_part(out, a.part_dtype))
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
        if a.finishing is not None:
            if a.finishing.done():
                exc = a.finishing.exception()
                if exc is not None:
                    self._fail(a.job, JobError(message=f"finishing the output failed: {_reason(exc)}"), a)
                    self._forget(a.job.id)
                elif a.finishing.result():
                    self._forget(a.job.id)
                # else cancelled while stitching: the next step's cancel check records it and cleans up
            return
        a.writes = [w for w in a.writes if not w.done() or w.exception() is not None]
        errors = [e for w in a.writes if w.done() and (e := w.exception()) is not None]
        if errors:
            self._fail(a.job, JobError(message=f"storing tiles failed: {_reason(errors[0])}"), a)
            self._forget(a.job.id)
            return
        if a.pending or a.in_flight or a.writes:
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
        a.finishing = self.io.submit(self._finish, a)

    def _forget(self, job_id: str) -> None:
        self.active.pop(job_id, None)
        self._rr = deque(j for j in self._rr if j != job_id)

    def _finish(self, a: _Active) -> bool:
        """Stitch the stored tiles into the COG, publish it, then drop the parts. False where a
        cancel stopped it."""
        job, prep = a.job, a.prep
        out = output_uri(job.spec, job.id)
        store = storage_for(out, self.settings)  # the output and its parts
        done = self._until_redis(self.store.tiles_done, job.id)
        if unrecorded := [
            t for t in prep.plan.tiles if str(t) not in done and store.exists(part_uri(job, t))
        ]:
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
        parts = (decode_part(store.read_bytes(part_uri(job, t)), t) for t in prep.plan.tiles)
        timings: dict[str, float] = {}
        ran = replace(
            prep, backend=a.backend, precision=a.precision
        )  # what the encoders ran, as a run's output says
        stac_uri = publish(
            ran,
            a.encoding,
            parts,
            out,
            self.settings,
            extra_tags={"job": job.id},
            owner=job.id,
            proceed=lambda: not self._until_redis(self.store.cancel_requested, job.id),
            timings=timings,
        )
        metrics.stage_seconds.labels("stitch").observe(timings["tiles_s"] + timings["cog_s"])
        if stac_uri is None:
            return False  # cancelled while stitching: the cancel path cleans up
        metrics.stage_seconds.labels("upload").observe(timings["upload_s"])
        try:
            self._until_redis(self.store.transition, job.id, JobState.SUCCEEDED, outputs=[out, stac_uri])
        except InvalidTransition:
            if self._until_redis(self.store.get, job.id).state is not JobState.SUCCEEDED:
                raise
            # an earlier try was recorded, its reply lost with the connection
        self._delete_parts(job)
        return True

    def _check_cancel(self, a: _Active) -> None:
        if not self.store.cancel_requested(a.job.id):
            return
        a.pending.clear()
        for ref, (batch, _) in list(self.refs.items()):
            if batch.job_id == a.job.id:
                self.ray.cancel(ref)
                self.refs.pop(ref)
        if a.finishing is not None and not a.finishing.done():
            return  # wait for the finisher to notice
        for w in a.writes:
            w.exception()  # let in-flight part writes land before deleting them
        with contextlib.suppress(TileFMError):  # already final
            self.store.transition(a.job.id, JobState.CANCELLED)
        self._forget(a.job.id)
        self._delete_parts(a.job)

    def _delete_parts(self, job: Job) -> None:
        """Remove everything under the job's `.parts-<id>/` (whichever plan wrote it). Never
        raises: the job's state is recorded by now, and parts left behind only take space."""
        prefix = parts_prefix(job)
        try:
            parts = storage_for(output_uri(job.spec, job.id), self.settings)
            folder = parse_uri(prefix.rstrip("/"))
            if isinstance(folder, FileLocation):
                if folder.path.is_dir():
                    for p in folder.path.iterdir():
                        parts.delete(p.as_uri())
                    with contextlib.suppress(OSError):
                        folder.path.rmdir()
            elif isinstance(parts, S3Storage):
                pages = parts.client.get_paginator("list_objects_v2").paginate(
                    Bucket=folder.bucket, Prefix=folder.key + "/"
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        parts.delete(f"s3://{folder.bucket}/{obj['Key']}")
        except Exception as e:  # noqa: BLE001 - logged; see above
            log.warning("job %s: parts under %s not removed: %s", job.id, prefix, _reason(e))

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
        self._delete_parts(job)

    def _stop_work(self, a: _Active) -> None:
        """Drop a job's queued batches and cancel its running ones, then wait for its part writes."""
        a.pending.clear()
        for ref, (batch, _) in list(self.refs.items()):
            if batch.job_id == a.job.id:
                self.ray.cancel(ref)
                self.refs.pop(ref)
        for w in a.writes:
            w.exception()

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
