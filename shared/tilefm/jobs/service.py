"""The job service's logic, shared by the HTTP and gRPC front ends: validate, record, query, cancel.

Front ends stay thin: they parse their wire format into `JobSpec`, call these methods, and map
`TileFMError`s to 4xx / gRPC status codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date

from tilefm.errors import StorageError, TileFMError
from tilefm.jobs.models import Job, JobEvent, JobSpec, JobState
from tilefm.jobs.store import JobStore
from tilefm.models.store import weights_path
from tilefm.pipeline import RunSpec, prepare
from tilefm.scene import open_scene
from tilefm.storage import storage_for
from tilefm.settings import Settings


def body_hash(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def output_uri(spec: JobSpec, job_id: str | None = None) -> str:
    """Where a job's COG goes: `<prefix>/<job id>/<model>.tif` (its STAC item beside it), so jobs
    sharing a prefix never overwrite each other; a prefix naming a .tif is used as is."""
    prefix = spec.output_prefix
    if prefix.lower().endswith((".tif", ".tiff")):
        return prefix
    return prefix.rstrip("/") + (f"/{job_id}" if job_id else "") + f"/{spec.model}.tif"


def run_spec(spec: JobSpec, *, out: str | None = None) -> RunSpec:
    try:
        d = date.fromisoformat(spec.date) if spec.date else None
    except ValueError:
        raise TileFMError(f"expected YYYY-MM-DD, got {spec.date!r}", field="date") from None
    return RunSpec(
        scene=dict(spec.scene), model=spec.model, out=out or output_uri(spec), zoom=spec.zoom,
        bbox=tuple(spec.bbox) if spec.bbox else None, backend=spec.backend, dtype=spec.dtype,
        asset_map=dict(spec.assets), date=d,
    )


class JobService:
    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings

    def validate(self, spec: JobSpec) -> int:
        """Everything checkable before acceptance; returns the plan's tile count."""
        for modality, source in spec.scene.items():
            _check_allowed(source, self.settings.allowed_sources, f"scene.{modality}")
        for key, path in spec.assets.items():
            _check_allowed(path, self.settings.allowed_sources, f"assets.{key}")
        _check_allowed(spec.output_prefix, self.settings.allowed_outputs, "output_prefix")
        if spec.dtype not in (None, "float16", "float32", "int8"):
            raise TileFMError(f"unknown dtype {spec.dtype!r} (float16, float32 or int8)", field="dtype")
        prep = _prepare_cached(spec, self.settings)
        return len(prep.plan.tiles)

    def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
        tiles = self.validate(spec)
        return self.store.create(spec, idempotency_key=idempotency_key, body_hash=body_hash(spec), total=tiles)

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self, *, state: JobState | None = None, limit: int = 20, cursor: str | None = None) -> tuple[list[Job], str | None]:
        return self.store.list(state=state, limit=limit, cursor=cursor)

    def cancel(self, job_id: str) -> Job:
        return self.store.request_cancel(job_id)

    def watch(
        self, job_id: str, *, poll_ms: int = 1000, timeout_s: float | None = None, stop: Callable[[], bool] | None = None
    ) -> Iterator[JobEvent]:
        """The job's current state, then its events, until a final state (or `stop()` / timeout).

        The stream position is taken before the snapshot, so nothing between them is lost and
        nothing older than the snapshot is replayed."""
        last = self.store.last_event_id(job_id)
        job = self.store.get(job_id)
        yield _event(job)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while not job.state.final:
            for last, event in self.store.events(job_id, last, block_ms=poll_ms):
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
    from datetime import datetime, timezone

    return JobEvent(job_id=job.id, state=job.state, progress=job.progress, time=datetime.now(timezone.utc))


class _TTLCache:
    """A small time-bounded memo: the same scene or output prefix checked again within `ttl_s`
    reuses the answer (files and buckets seldom change between two submissions)."""

    def __init__(self, ttl_s: float, size: int = 256):
        self.ttl_s, self.size = ttl_s, size
        self.items: dict[str, tuple[float, object]] = {}
        self.making: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def get(self, key: str, make: Callable[[], object]) -> object:
        """The cached value, or `make()`'s; concurrent misses on one key wait for a single
        `make()` instead of all opening the same files at once."""
        with self.lock:
            key_lock = self.making.setdefault(key, threading.Lock())
        with key_lock:
            now = time.monotonic()
            with self.lock:
                hit = self.items.get(key)
                if hit and now - hit[0] < self.ttl_s:
                    return hit[1]
            value = make()  # errors are not cached: a fixed input is seen at once
            with self.lock:
                if len(self.items) >= self.size:
                    old = next(iter(self.items))
                    self.items.pop(old)
                    self.making.pop(old, None)
                self.items[key] = (now, value)
            return value


_scenes = _TTLCache(30.0)
_writable = _TTLCache(60.0)
_weights = _TTLCache(60.0)


def _prepare_cached(spec: JobSpec, settings: Settings):
    """Validation opens every file of the scene and probes the output location: both are cached
    briefly so that a burst of submissions stays fast."""

    def open_cached(sources, *, asset_map=None, date_override=None):
        key = json.dumps([sources, asset_map, str(date_override)], sort_keys=True)
        return _scenes.get(key, lambda: open_scene(sources, asset_map=asset_map, date_override=date_override))

    def writable_cached(uri: str) -> None:
        prefix = uri.rsplit("/", 1)[0]
        _writable.get(f"{prefix}|{settings.s3_endpoint_url}", lambda: storage_for(uri, settings).check_writable(uri))

    def weights_cached(card, store):
        return _weights.get(f"{card.name}|{store}", lambda: weights_path(card, store))

    try:
        return prepare(run_spec(spec), settings, open_scene_fn=open_cached, check_writable_fn=writable_cached,
                       weights_fn=weights_cached)
    except StorageError as e:
        e.field = "output_prefix"
        raise


def _normalise(location: str) -> str:
    """Local paths and file:// URIs as resolved absolute paths (no `..` escapes); URIs as given."""
    if location.startswith("file://"):
        location = location[7:]
    if "://" in location:
        return location
    return os.path.realpath(os.path.expanduser(location))


def _check_allowed(location: str, allowed: list[str], field: str) -> None:
    if any(ord(c) < 32 for c in location):
        raise TileFMError("control characters are not allowed in a path or URI", field=field)
    if not allowed:
        return
    loc = _normalise(location)
    for prefix in allowed:
        p = _normalise(prefix)
        if loc == p or loc.startswith(p.rstrip("/") + "/"):
            return
    raise TileFMError(f"{location!r} is outside the locations this service may use ({', '.join(allowed)})", field=field)
