"""The job service's logic, shared by the HTTP and gRPC front ends: validate, record, query, cancel.

Front ends stay thin: they parse their wire format into `JobSpec`, call these methods, and map
`TileFMError`s to 4xx / gRPC status codes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

from tilefm.engine.pipeline import Prepared, RunSpec, check_unclaimed, prepare
from tilefm.errors import StorageError, TileFMError
from tilefm.io.scene import Scene, open_scene
from tilefm.jobs import locations
from tilefm.jobs.models import Job, JobEvent, JobSpec, JobState
from tilefm.jobs.store import JobStore
from tilefm.models.store import weights_path
from tilefm.settings import Settings
from tilefm.storage import storage_for

if TYPE_CHECKING:
    from pathlib import Path

    from redis.asyncio import Redis as AsyncRedis

    from tilefm.card import ModelCard


def body_hash(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def output_uri(spec: JobSpec, job_id: str) -> str:
    """Where job `job_id` writes its COG: `<output_prefix>/<job id>/<model>.tif`, its STAC item
    beside it. The job's own id names the folder, so jobs sharing a prefix never write the same key."""
    return locations.output_uri(spec.output_prefix, spec.model, job_id)


def run_spec(spec: JobSpec, *, out: str | None = None) -> RunSpec:
    """The run of `spec`, writing to `out`; without one (validation, before the job has an id) to
    `<output_prefix>/<model>.tif`, a name only used to probe that the prefix can be written."""
    try:
        d = date.fromisoformat(spec.date) if spec.date else None
    except ValueError:
        raise TileFMError(f"expected YYYY-MM-DD, got {spec.date!r}", field="date") from None
    probe = spec.output_prefix.rstrip("/") + f"/{spec.model}.tif"
    return RunSpec(
        scene=dict(spec.scene),
        model=spec.model,
        out=out or probe,
        zoom=spec.zoom,
        bbox=(spec.bbox[0], spec.bbox[1], spec.bbox[2], spec.bbox[3]) if spec.bbox else None,
        backend=spec.backend,
        precision=spec.precision,
        dtype=spec.dtype,
        asset_map=dict(spec.assets),
        date=d,
    )


def resolve_paths(spec: JobSpec) -> JobSpec:
    """`spec` with its relative local paths made absolute, once, at submission: the record then
    names the same files for every process that opens them, whatever its working folder."""
    scene = {
        k: locations.absolute(v) if isinstance(v, str) else [locations.absolute(s) for s in v]
        for k, v in spec.scene.items()
    }
    assets = {k: locations.absolute(v) for k, v in spec.assets.items()}
    prefix = locations.absolute(spec.output_prefix)
    if (scene, assets, prefix) == (spec.scene, spec.assets, spec.output_prefix):
        return spec
    return spec.model_copy(update={"scene": scene, "assets": assets, "output_prefix": prefix})


def check_locations(spec: JobSpec, settings: Settings) -> None:
    """Every location `spec` names is inside the allowlists, and its output prefix is a folder."""
    for field, source in spec.sources():  # each source of a time series too
        locations.check_allowed(source, settings.allowed_sources, field)
    for key, path in spec.assets.items():
        locations.check_allowed(path, settings.allowed_sources, f"assets.{key}")
    locations.check_allowed(spec.output_prefix, settings.allowed_outputs, "output_prefix")
    locations.check_output_prefix(spec.output_prefix)


def open_scene_for(settings: Settings) -> Callable[..., Scene]:
    """`open_scene` as the service opens scenes: every file or URL checked against the source
    allowlist before GDAL sees it, and S3 read with the service's endpoint and keys."""
    return functools.partial(
        open_scene, check=locations.source_check(settings.allowed_sources), settings=settings
    )


def prepare_job(job: Job, settings: Settings) -> Prepared:
    """A queued job's run, as its scheduler starts it: the locations checked again (files may
    have changed since the job was accepted), written to the job's own key, and refused if
    something this job did not write is already there."""
    check_locations(job.spec, settings)
    out = output_uri(job.spec, job.id)

    def check_writable(uri: str) -> None:
        storage_for(uri, settings).check_writable(uri)
        check_unclaimed(uri, job.id, settings)

    return prepare(
        run_spec(job.spec, out=out),
        settings,
        open_scene_fn=open_scene_for(settings),
        check_writable_fn=check_writable,
    )


class JobService:
    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings

    def warm(self) -> None:
        """What every first submission would pay, paid at start-up: the model cards parsed and
        each one's weights found and verified (~100 ms of a worker's first request otherwise)."""
        from tilefm.models import list_cards

        for card in list_cards():
            with contextlib.suppress(TileFMError):  # not installed here: submissions for it get the error
                _cached_weights(card, self.settings.model_store)

    def validate(self, spec: JobSpec, *, block: bool = True) -> int:
        """Everything checkable before acceptance; returns the plan's tile count. With
        `block=False` it only uses what the caches already hold and raises `CacheMiss` where it
        would have to open files or reach the object store (an event loop then hands it to a
        thread)."""
        check_locations(spec, self.settings)
        if spec.dtype not in (None, "float16", "float32", "int8"):
            raise TileFMError(f"unknown dtype {spec.dtype!r} (float16, float32 or int8)", field="dtype")
        prep = _prepare_cached(spec, self.settings, block=block)
        return len(prep.plan.tiles)

    def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
        spec = resolve_paths(spec)
        tiles = self.validate(spec)
        return self.store.create(
            spec, idempotency_key=idempotency_key, body_hash=body_hash(spec), total=tiles
        )

    async def submit_async(
        self, spec: JobSpec, *, idempotency_key: str | None = None, aredis: AsyncRedis | None = None
    ) -> tuple[Job, bool]:
        """`submit` for an event loop: validation from warm caches and the record over an asyncio
        Redis client run on the loop; only cache misses (files, object store) take a thread. A
        submission is ~1 ms of CPU, and a thread hop per request cost a fifth of the throughput."""
        spec = resolve_paths(spec)
        try:
            tiles = self.validate(spec, block=False)
        except CacheMiss:
            tiles = await anyio.to_thread.run_sync(self.validate, spec)
        digest = body_hash(spec)
        if aredis is None:
            create = functools.partial(
                self.store.create, spec, idempotency_key=idempotency_key, body_hash=digest, total=tiles
            )
            return await anyio.to_thread.run_sync(create)
        return await self.store.create_async(
            aredis, spec, idempotency_key=idempotency_key, body_hash=digest, total=tiles
        )

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(
        self, *, state: JobState | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        return self.store.list(state=state, limit=limit, cursor=cursor)

    def cancel(self, job_id: str) -> Job:
        return self.store.request_cancel(job_id)

    def watch(
        self,
        job_id: str,
        *,
        poll_ms: int = 1000,
        timeout_s: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[JobEvent]:
        """The job's current state, then its events, until a final state (or `stop()` / timeout).

        The stream position is taken before the snapshot, so nothing between them is lost and
        nothing older than the snapshot is replayed."""
        last = self.store.last_event_id(job_id)
        job = self.store.get(job_id)
        yield _event(job)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while not job.state.final:
            for event_id, event in self.store.events(job_id, last, block_ms=poll_ms):
                last = event_id
                yield event
                if event.state.final:
                    return
            if (stop and stop()) or (deadline and time.monotonic() > deadline):
                return
            job = self.store.get(job_id)
            if job.state.final:  # the final event fell out of the capped stream, or raced the read
                yield _event(job)
                return


def _event(job: Job) -> JobEvent:
    from datetime import datetime

    return JobEvent(job_id=job.id, state=job.state, progress=job.progress, time=datetime.now(UTC))


class CacheMiss(Exception):
    """Validation would have to open files or probe storage; raised only with `block=False`."""


V = TypeVar("V")


class _TTLCache(Generic[V]):
    """A small time-bounded memo: the same scene or output prefix checked again within `ttl_s`
    reuses the answer (files and buckets seldom change between two submissions).

    An answer older than `ttl_s` but younger than `ttl_s + stale_s` is still served while one
    background thread remakes it, so that expiry never stalls the submissions in flight (opening
    a scene takes ~70 ms); a failed remake drops the entry, and the next caller sees the error."""

    def __init__(self, ttl_s: float, size: int = 256, stale_s: float = 300.0):
        self.ttl_s, self.size, self.stale_s = ttl_s, size, stale_s
        self.items: dict[str, tuple[float, V]] = {}
        self.making: dict[str, threading.Lock] = {}
        self.refreshing: set[str] = set()
        self.lock = threading.Lock()

    def get(self, key: str, make: Callable[[], V], *, block: bool = True) -> V:
        """The cached value, or `make()`'s; concurrent misses on one key wait for a single
        `make()` instead of all opening the same files at once. `block=False`: `CacheMiss`
        instead of making it here."""
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                age = time.monotonic() - hit[0]
                if age < self.ttl_s:
                    return hit[1]
                if age < self.ttl_s + self.stale_s:
                    if key not in self.refreshing:
                        self.refreshing.add(key)
                        threading.Thread(target=self._refresh, args=(key, make), daemon=True).start()
                    return hit[1]
            if not block:
                raise CacheMiss(key)
            key_lock = self.making.setdefault(key, threading.Lock())
        with key_lock:
            with self.lock:
                hit = self.items.get(key)
                if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
                    return hit[1]  # made while this caller waited
            value = make()  # errors are not cached: a fixed input is seen at once
            self._put(key, value)
            return value

    def _put(self, key: str, value: V) -> None:
        with self.lock:
            if key not in self.items and len(self.items) >= self.size:
                old = next(iter(self.items))
                self.items.pop(old)
                self.making.pop(old, None)
            self.items[key] = (time.monotonic(), value)

    def _refresh(self, key: str, make: Callable[[], V]) -> None:
        try:
            self._put(key, make())
        except Exception:  # noqa: BLE001 - the next caller remakes it and gets the error itself
            with self.lock:
                self.items.pop(key, None)
        finally:
            with self.lock:
                self.refreshing.discard(key)


_scenes: _TTLCache[Scene] = _TTLCache(30.0)
_writable: _TTLCache[None] = _TTLCache(60.0)
_weights: _TTLCache[Path | None] = _TTLCache(60.0)


def _cached_weights(card: ModelCard, store: Path, *, block: bool = True) -> Path | None:
    return _weights.get(f"{card.name}|{store}", lambda: weights_path(card, store), block=block)


def _prepare_cached(spec: JobSpec, settings: Settings, *, block: bool = True) -> Prepared:
    """Validation opens every file of the scene and probes the output location: both are cached
    briefly so that a burst of submissions stays fast."""

    open_checked = open_scene_for(settings)

    def open_cached(
        sources: Mapping[str, str | Sequence[str]],
        *,
        asset_map: dict[str, str] | None = None,
        date_override: date | None = None,
    ) -> Scene:
        # the allowlist and the S3 endpoint are part of the key: a scene one service may open
        # is not thereby open to another with other settings in the same process
        key = json.dumps(
            [sources, asset_map, str(date_override), settings.allowed_sources, settings.s3_endpoint_url],
            sort_keys=True,
        )
        return _scenes.get(
            key, lambda: open_checked(sources, asset_map=asset_map, date_override=date_override), block=block
        )

    def writable_cached(uri: str) -> None:
        # creating nothing: a submission that is refused, or never run, leaves no folder behind
        prefix = uri.rsplit("/", 1)[0]
        _writable.get(
            f"{prefix}|{settings.s3_endpoint_url}",
            lambda: storage_for(uri, settings).check_creatable(uri),
            block=block,
        )

    try:
        return prepare(
            run_spec(spec),
            settings,
            open_scene_fn=open_cached,
            check_writable_fn=writable_cached,
            weights_fn=functools.partial(_cached_weights, block=block),
        )
    except StorageError as e:
        e.field = "output_prefix"
        raise
