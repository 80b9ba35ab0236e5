"""The scheduler: a Ray driver that runs queued jobs, several at once, on shared encoder actors.

Why a long-running driver process rather than the Ray Jobs API: tiles of many jobs share the same
encoder actors (a model loaded once per GPU, not once per job), batches are interleaved
round-robin across running jobs so a big job cannot starve a small one, and per-tile progress
goes to Redis as each tile lands. The driver holds no state that matters: every finished tile's
contribution is stored beside the job's output (`.parts/`) and recorded in Redis, and the job's
lease expires if the driver dies, so another (or the restarted) scheduler re-queues the job and
resumes it without redoing finished tiles.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from tilefm import metrics
from tilefm.errors import TileFMError
from tilefm.grid import Tile
from tilefm.jobs.models import Job, JobError, JobEvent, JobState, TileFailure
from tilefm.jobs.service import output_uri, run_spec
from tilefm.jobs.store import JobStore
from tilefm.models.base import TileOutput
from tilefm.pipeline import DEFAULT_BATCH, Prepared, batches, prepare, publish
from tilefm.runtime import EncoderPool, WorkerSpec, connect, remote_reader, start_encoders
from tilefm.settings import Settings
from tilefm.stitch import Encoding
from tilefm.storage import FileLocation, parse_uri, storage_for

log = logging.getLogger(__name__)


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
        return TileOutput(tile=tile, halo=int(z["halo"]), values=z["values"].astype(np.float32), weight=z["weight"])


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

    @property
    def part_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.encoding.nbits == 16 or self.encoding.dtype == "int8" else np.dtype(np.float32)


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
        self.ray = None
        self._rr: deque[str] = deque()
        self._last_renew = 0.0
        self._lock = threading.Lock()

    # -- main loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, *, idle_sleep: float = 0.5) -> None:
        stop = stop or threading.Event()
        self.ray = connect(self.settings)
        self._read = remote_reader(self.ray, self.settings)
        log.info("scheduler %s started", self.owner)
        try:
            while not stop.is_set():
                busy = self.step()
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
            self._start(job)
        for a in list(self.active.values()):
            self._check_cancel(a)
        self._dispatch()
        self._collect(timeout=0.2 if self.refs else 0)
        for a in list(self.active.values()):
            self._maybe_finish(a)
        return bool(self.active)

    def shutdown(self) -> None:
        self.io.shutdown(wait=True)
        if self.ray is not None:
            for pool in self.pools.values():
                for actor in pool.actors:
                    self.ray.kill(actor)
        self.pools.clear()

    # -- jobs ----------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        try:
            prep = prepare(run_spec(job.spec, out=output_uri(job.spec, job.id)), self.settings)
        except TileFMError as e:
            self._fail(job.id, JobError(message=str(e), field=e.field))
            return
        done = self.store.tiles_done(job.id)
        todo = [t for t in prep.plan.tiles if str(t) not in done]
        self.store.set_total(job.id, len(prep.plan.tiles))
        pool = self._pool(prep)  # load the model before the first batch (on GPUs: its batch size)
        a = _Active(
            job=job, prep=prep, encoding=Encoding.for_card(prep.card, job.spec.dtype),
            pending=deque(_Batch(job.id, b) for b in batches(todo, self.batch_size or pool.batch_size or DEFAULT_BATCH)),
            done_at_start=len(done), done=len(done), backend=pool.backend, precision=pool.precision(self._worker(prep)),
        )
        self.active[job.id] = a
        self._rr.append(job.id)
        self._event(a, f"running: {len(todo)} of {len(prep.plan.tiles)} tiles to do")

    @staticmethod
    def _worker(prep: Prepared) -> WorkerSpec:
        return WorkerSpec(card=prep.card, backend=prep.backend, weights=prep.weights, precision=prep.precision, out_dtype=prep.spec.dtype)

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
            self.pools[key] = start_encoders(self.ray, self._worker(prep), self.settings, requested=prep.spec.backend)
            metrics.ray_actors.set(sum(len(p.actors) for p in self.pools.values()))
        return self.pools[key]

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
        ref = getattr(a, "_scene", None)
        if ref is None:
            ref = self.ray.put(a.prep.scene)
            a._scene = ref  # type: ignore[attr-defined]
        return ref

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
            except Exception as e:  # a task or actor that failed past Ray's own retries
                batch.attempt += 1
                if batch.attempt < self.max_attempts and a.finishing is None:
                    log.warning("job %s: batch %s failed (%s); retrying", a.job.id, batch.tiles, e)
                    a.pending.appendleft(batch)
                else:
                    for t in batch.tiles:
                        a.failed[str(t)] = _reason(e)
                        self.store.tile_failed(a.job.id, str(t), _reason(e))
                        metrics.tiles_failed.labels(a.prep.card.name, a.prep.backend).inc()
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
            if self.store.tile_done(a.job.id, str(out.tile)):
                with self._lock:
                    a.done += 1
                metrics.tiles_processed.labels(*labels).inc()
        now = time.monotonic()
        if now - a.last_event > 0.5:
            self._event(a)

    def _maybe_finish(self, a: _Active) -> None:
        if a.finishing is not None:
            if a.finishing.done():
                self.active.pop(a.job.id, None)
                self._rr = deque(j for j in self._rr if j != a.job.id)
                exc = a.finishing.exception()
                if exc is not None:
                    self._fail(a.job.id, JobError(message=f"finishing the output failed: {_reason(exc)}"))
            return
        a.writes = [w for w in a.writes if not w.done() or w.exception() is not None]
        errors = [w.exception() for w in a.writes if w.done() and w.exception() is not None]
        if errors:
            self.active.pop(a.job.id, None)
            self._fail(a.job.id, JobError(message=f"storing tiles failed: {_reason(errors[0])}"))
            return
        if a.pending or a.in_flight or a.writes:
            return
        if a.failed:
            self.active.pop(a.job.id, None)
            tiles = [TileFailure(tile=t, reason=r) for t, r in sorted(a.failed.items())]
            self._fail(a.job.id, JobError(message=f"{len(tiles)} tiles failed after {self.max_attempts} attempts", tiles=tiles))
            return
        a.finishing = self.io.submit(self._finish, a)

    def _finish(self, a: _Active) -> None:
        """Stitch the stored tiles into the COG, publish it, then drop the parts."""
        job, prep = a.job, a.prep
        done = self.store.tiles_done(job.id)
        missing = [str(t) for t in prep.plan.tiles if str(t) not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} tiles not recorded as done: {', '.join(missing[:5])}")
        out = output_uri(job.spec, job.id)
        store = storage_for(out, self.settings)  # the output and its parts
        parts = (decode_part(store.read_bytes(part_uri(job, t)), t) for t in prep.plan.tiles)
        timings: dict[str, float] = {}
        ran = replace(prep, backend=a.backend, precision=a.precision)  # what the encoders ran, as a run's output says
        stac_uri = publish(ran, a.encoding, parts, out, self.settings, extra_tags={"job": job.id},
                           proceed=lambda: not self.store.cancel_requested(job.id), timings=timings)
        metrics.stage_seconds.labels("stitch").observe(timings["tiles_s"] + timings["cog_s"])
        if stac_uri is None:
            return  # cancelled while stitching: the cancel path cleans up
        metrics.stage_seconds.labels("upload").observe(timings["upload_s"])
        self.store.transition(job.id, JobState.SUCCEEDED, outputs=[out, stac_uri])
        self._delete_parts(job, prep)

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
        self.active.pop(a.job.id, None)
        self._rr = deque(j for j in self._rr if j != a.job.id)
        try:
            self.store.transition(a.job.id, JobState.CANCELLED)
        except TileFMError:
            pass  # already final
        self._delete_parts(a.job, a.prep)

    def _delete_parts(self, job: Job, prep: Prepared) -> None:
        parts = storage_for(output_uri(job.spec, job.id), self.settings)
        for t in prep.plan.tiles:
            parts.delete(part_uri(job, t))
        folder = parse_uri(parts_prefix(job).rstrip("/"))
        if isinstance(folder, FileLocation):  # object stores have no folders to leave behind
            with contextlib.suppress(OSError):
                folder.path.rmdir()

    def _fail(self, job_id: str, error: JobError) -> None:
        log.error("job %s failed: %s", job_id, error.message)
        self.store.transition(job_id, JobState.FAILED, error=error)

    def _event(self, a: _Active, message: str = "") -> None:
        """A progress event (state changes are published by the store itself)."""
        a.last_event = time.monotonic()
        elapsed = max(time.monotonic() - a.started, 1e-6)
        rate = (a.done - a.done_at_start) / elapsed
        job = self.store.get(a.job.id)
        self.store.publish(JobEvent(job_id=a.job.id, state=job.state, progress=job.progress, tiles_per_second=round(rate, 3), time=_now(), message=message))

    def _renew_leases(self) -> None:
        now = time.monotonic()
        if now - self._last_renew < self.lease_s / 3:
            return
        self._last_renew = now
        for job_id in list(self.active):
            if not self.store.renew_lease(job_id, self.owner, self.lease_s):
                log.warning("job %s: lease lost; dropping it here", job_id)
                self.active.pop(job_id, None)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]


def _now() -> datetime:
    return datetime.now(timezone.utc)
