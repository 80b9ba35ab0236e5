"""The scheduler on a local Ray cluster, with faults injected: an encoder actor killed mid-job is
restarted by Ray and the job still finishes with every tile exactly once; a job whose stitching
fails leaves no parts.

Each run happens in a child Python process (`_child`): faults are injected into the scheduler's
own objects there, and Ray's driver, with the scheduler's threads still inside its API, never
lives in the pytest process, where `ray.shutdown()` may leave them on freed state (a crash later
in an unrelated test)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tilefm.jobs.models import JobSpec, JobState
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


def _child(scenario: str, prefix: str, job_id: str, timeout: float) -> None:
    """Run `scenario` (a function of this module) in a child process, until the job is final."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_scheduler_faults as m; m.{scenario}({prefix!r}, {job_id!r}, {timeout!r})"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout + 120)
    assert r.returncode == 0, r.stderr[-4000:]


def _run_scheduler(scheduler, store: JobStore, job_id: str, timeout: float, during=None) -> None:
    """`scheduler` on a thread until the job is final; `during(scheduler)` once, after two tiles."""
    import ray

    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        if during is not None:
            while store.get(job_id).progress.tiles_done < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            during(scheduler)
        while not store.get(job_id).state.final:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
        ray.shutdown()


def kill_an_actor(prefix: str, job_id: str, timeout: float) -> None:
    """In the child: batches of 2 tiles; after two tiles, the encoder actor is killed."""
    import ray

    from tilefm.jobs.scheduler import Scheduler

    store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=prefix)
    settings = Settings(redis_prefix=prefix, job_lease_s=10)

    def kill(scheduler: Scheduler) -> None:
        (actor,) = next(iter(scheduler.pools.values())).actors
        ray.kill(actor, no_restart=False)  # Ray restarts it and retries its tasks

    _run_scheduler(Scheduler(store, settings, batch_size=2), store, job_id, timeout, during=kill)


def fail_stitching(prefix: str, job_id: str, timeout: float) -> None:
    """In the child: the job's `publish` fails once every tile is in."""
    from tilefm.jobs import scheduler as scheduler_module

    def failing_publish(prep, encoding, outputs, *args, **kwargs):
        for _ in outputs:  # the stitcher's queue ends once every tile's part is stored and recorded
            pass
        raise OSError("no space left on device")

    scheduler_module.publish = failing_publish
    store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=prefix)
    settings = Settings(redis_prefix=prefix, job_lease_s=10)
    _run_scheduler(scheduler_module.Scheduler(store, settings), store, job_id, timeout)


def test_killed_encoder_actor_is_replaced_and_no_tile_is_lost(
    store: JobStore, scene_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(redis_prefix=store.prefix, job_lease_s=10)
    spec = JobSpec(
        scene={"s2": str(scene_dir)},
        model="ukis-csmask",
        zoom=11,
        bbox=(-11.6, 24.6, -11.2, 24.95),
        output_prefix=(tmp_path / "out").as_uri() + "/",
    )
    job, _ = JobService(store, settings).submit(spec)
    total = job.progress.tiles_total
    assert total >= 9
    _child("kill_an_actor", store.prefix, job.id, timeout=300)
    j = store.get(job.id)
    assert j.state == JobState.SUCCEEDED, j.error
    assert j.progress.tiles_done == total and j.progress.tiles_failed == 0
    assert len(store.tiles_done(job.id)) == total
    assert Path(j.outputs[0].removeprefix("file://")).is_file()
    # the parts are gone
    assert not list((tmp_path / "out").rglob("*.npz")) and not list((tmp_path / "out").rglob(".parts-*"))


def test_failed_job_leaves_no_parts(store: JobStore, scene_dir: Path, s3_settings: Settings) -> None:
    """Stitching fails once every tile's part is stored: the job fails and its `.parts-<id>/` goes
    (a failed job is never resumed, so nothing else would remove them)."""
    from tilefm.storage import storage_for

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
    _child("fail_stitching", store.prefix, job.id, timeout=240)
    j = store.get(job.id)
    assert j.state == JobState.FAILED and "no space left on device" in j.error.message, j.error
    assert j.progress.tiles_done == j.progress.tiles_total > 0  # every part was stored before the failure
    listed = storage_for(spec.output_prefix, s3_settings).client.list_objects_v2(
        Bucket="tilefm", Prefix=prefix
    )
    assert [o["Key"] for o in listed.get("Contents", [])] == []
