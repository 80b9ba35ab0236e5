"""The scheduler in-process on a local Ray cluster: an encoder actor killed mid-job is restarted by
Ray and the job still finishes with every tile exactly once."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from tilefm.jobs.models import JobSpec, JobState
from tilefm.jobs.scheduler import Scheduler
from tilefm.jobs.service import JobService
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings

#: the scheduler on a local Ray cluster
pytestmark = pytest.mark.integration


@pytest.fixture
def store() -> JobStore:
    prefix = f"tilefm-test-{uuid.uuid4().hex[:8]}:"
    s = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=prefix)
    yield s
    keys = list(s.redis.scan_iter(f"{prefix}*"))
    if keys:
        s.redis.delete(*keys)


def test_killed_encoder_actor_is_replaced_and_no_tile_is_lost(
    store: JobStore, scene_dir: Path, tmp_path: Path
) -> None:
    import ray

    settings = Settings(redis_prefix=store.prefix, job_lease_s=10)
    service = JobService(store, settings)
    spec = JobSpec(
        scene={"s2": str(scene_dir)},
        model="ukis-csmask",
        zoom=11,
        bbox=(-11.6, 24.6, -11.2, 24.95),
        output_prefix=(tmp_path / "out").as_uri() + "/",
    )
    job, _ = service.submit(spec)
    total = job.progress.tiles_total
    assert total >= 9
    scheduler = Scheduler(store, settings, batch_size=2)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while store.get(job.id).progress.tiles_done < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (actor,) = next(iter(scheduler.pools.values())).actors
        ray.kill(actor, no_restart=False)  # Ray restarts it and retries its tasks
        while (j := store.get(job.id)).state not in (JobState.SUCCEEDED, JobState.FAILED):
            assert time.monotonic() < deadline + 180, j
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
        ray.shutdown()
    assert j.state == JobState.SUCCEEDED, j.error
    assert j.progress.tiles_done == total and j.progress.tiles_failed == 0
    assert len(store.tiles_done(job.id)) == total
    assert Path(j.outputs[0].removeprefix("file://")).is_file()
    # the parts are gone
    assert not list((tmp_path / "out").rglob("*.npz")) and not list((tmp_path / "out").rglob(".parts-*"))


def test_failed_job_leaves_no_parts(
    store: JobStore, scene_dir: Path, s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stitching fails once every tile's part is stored: the job fails and its `.parts-<id>/` goes
    (a failed job is never resumed, so nothing else would remove them)."""
    import ray

    from tilefm.jobs import scheduler as scheduler_module
    from tilefm.storage import storage_for

    def failing_publish(prep, encoding, outputs, *args, **kwargs):
        next(iter(outputs))  # the parts are there to read
        raise OSError("no space left on device")

    monkeypatch.setattr(scheduler_module, "publish", failing_publish)
    settings = Settings(redis_prefix=store.prefix, job_lease_s=10)
    prefix = f"failing/{uuid.uuid4().hex[:8]}/"
    spec = JobSpec(
        scene={"s2": str(scene_dir)},
        model="ukis-csmask",
        zoom=11,
        bbox=(-11.5, 24.7, -11.3, 24.85),
        output_prefix=f"s3://tilefm/{prefix}",
    )
    job, _ = JobService(store, settings).submit(spec)
    stop = threading.Event()
    thread = threading.Thread(target=Scheduler(store, settings).run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while (j := store.get(job.id)).state not in (JobState.SUCCEEDED, JobState.FAILED):
            assert time.monotonic() < deadline, j
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
        ray.shutdown()
    assert j.state == JobState.FAILED and "no space left on device" in j.error.message, j.error
    assert j.progress.tiles_done == j.progress.tiles_total > 0  # every part was stored before the failure
    listed = storage_for(spec.output_prefix, s3_settings).client.list_objects_v2(
        Bucket="tilefm", Prefix=prefix
    )
    assert [o["Key"] for o in listed.get("Contents", [])] == []
