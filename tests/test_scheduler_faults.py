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


@pytest.fixture
def store() -> JobStore:
    prefix = f"tilefm-test-{uuid.uuid4().hex[:8]}:"
    s = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=prefix)
    yield s
    keys = list(s.redis.scan_iter(f"{prefix}*"))
    if keys:
        s.redis.delete(*keys)


def test_killed_encoder_actor_is_replaced_and_no_tile_is_lost(store: JobStore, scene_dir: Path, tmp_path: Path) -> None:
    import ray

    settings = Settings(redis_prefix=store.prefix, job_lease_s=10)
    service = JobService(store, settings)
    spec = JobSpec(scene={"s2": str(scene_dir)}, model="ukis-csmask", zoom=11, bbox=(-11.6, 24.6, -11.2, 24.95),
                   output_prefix=(tmp_path / "out").as_uri() + "/")
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
