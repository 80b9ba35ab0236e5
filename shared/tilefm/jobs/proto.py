"""Conversions between the job models (`tilefm.jobs.models`, pydantic) and the protobuf messages of
`protos/tilefm/v1/jobs.proto`.

The protobuf modules are generated at install time (setup.py's build_py, run by `pip install` and
`make install`) into `tilefm._proto.tilefm.v1`; they are not in git. `pb` and `pb_grpc` below are
those modules.

What is kept exactly:
- absent vs set for the optional fields: JobSpec.zoom / bbox / dtype / date / priority,
  Timings.started / finished, Job.error, JobError.field (proto3 `optional` or a message field,
  both of which have presence);
- timestamps to the microsecond (pydantic's resolution), as UTC: an aware datetime comes back
  equal, in UTC; a naive one is taken as UTC;
- the states: JobState <-> JOB_STATE_*; JOB_STATE_UNSPECIFIED means "none" (a List filter) and is
  refused where a state is required.

`spec_from_proto` / `job_from_proto` / `event_from_proto` validate through pydantic, so they raise
`pydantic.ValidationError` for out-of-range values (the gRPC layer turns that into
INVALID_ARGUMENT).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

try:
    from tilefm._proto.tilefm.v1 import jobs_pb2 as pb
    from tilefm._proto.tilefm.v1 import jobs_pb2_grpc as pb_grpc
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    if not (exc.name or "").startswith("tilefm._proto"):
        raise
    raise ModuleNotFoundError(
        "tilefm's generated protobuf / gRPC code (tilefm._proto, built from protos/tilefm/v1/*.proto) "
        "is missing: run `make install` (or `make protos`, or `pip install -e .`), which generates it",
        name=exc.name,
    ) from exc

from google.protobuf.timestamp_pb2 import Timestamp

from tilefm.errors import TileFMError
from tilefm.jobs.models import Job, JobError, JobEvent, JobSpec, JobState, Progress, TileFailure, Timings

__all__ = [
    "pb",
    "pb_grpc",
    "state_to_proto",
    "state_from_proto",
    "spec_to_proto",
    "spec_from_proto",
    "spec_to_dict",
    "job_to_proto",
    "job_from_proto",
    "event_to_proto",
    "event_from_proto",
    "datetime_to_proto",
    "datetime_from_proto",
]

# the generated enum's Value() is typed as returning a plain int; its values are the enum's members
_STATE_TO_PROTO: dict[JobState, pb.JobState] = {
    s: cast("pb.JobState", pb.JobState.Value(f"JOB_STATE_{s.name}")) for s in JobState
}
_STATE_FROM_PROTO: dict[int, JobState] = {v: s for s, v in _STATE_TO_PROTO.items()}


# -- scalars -------------------------------------------------------------------------------------


def state_to_proto(state: JobState | None) -> pb.JobState:
    """JobState -> JOB_STATE_* (None -> JOB_STATE_UNSPECIFIED)."""
    return pb.JOB_STATE_UNSPECIFIED if state is None else _STATE_TO_PROTO[JobState(state)]


def state_from_proto(value: int) -> JobState | None:
    """JOB_STATE_* -> JobState; JOB_STATE_UNSPECIFIED -> None. ValueError for a number this version
    does not know."""
    if value == pb.JOB_STATE_UNSPECIFIED:
        return None
    try:
        return _STATE_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown job state {value}") from None


def _required_state(value: int) -> JobState:
    state = state_from_proto(value)
    if state is None:
        raise ValueError("state is JOB_STATE_UNSPECIFIED")
    return state


def datetime_to_proto(dt: datetime) -> Timestamp:
    """A datetime as a Timestamp (a naive datetime is taken as UTC)."""
    ts = Timestamp()
    ts.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    return ts


def datetime_from_proto(ts: Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime."""
    return ts.ToDatetime(tzinfo=UTC)


# -- JobSpec -------------------------------------------------------------------------------------


def spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    msg = pb.JobSpec(
        scene={k: v for k, v in spec.scene.items() if isinstance(v, str)},
        scene_series={k: pb.SourceList(sources=v) for k, v in spec.scene.items() if not isinstance(v, str)},
        model=spec.model,
        output_prefix=spec.output_prefix,
        backend=spec.backend,
        assets=dict(spec.assets),
        priority=spec.priority,
        labels=dict(spec.labels),
    )
    if spec.zoom is not None:
        msg.zoom = spec.zoom
    if spec.bbox is not None:
        min_lon, min_lat, max_lon, max_lat = spec.bbox
        msg.bbox.CopyFrom(pb.BBox(min_lon=min_lon, min_lat=min_lat, max_lon=max_lon, max_lat=max_lat))
    if spec.dtype is not None:
        msg.dtype = spec.dtype
    if spec.date is not None:
        msg.date = spec.date
    if spec.precision is not None:
        msg.precision = spec.precision
    return msg


def spec_to_dict(msg: pb.JobSpec) -> dict[str, Any]:
    """The JobSpec fields a message sets, as a dict for `JobSpec.model_validate`: absent optional
    fields and an empty backend are left out, so the model's defaults apply. A time series
    (`scene_series`) is a list in `scene`; a modality in both is refused (a TileFMError naming it)."""
    both = sorted(set(msg.scene) & set(msg.scene_series))
    if both:
        raise TileFMError(
            f"{both[0]!r} is in both scene and scene_series: give its sources in one of them",
            field=f"scene.{both[0]}",
        )
    data: dict[str, Any] = {
        "scene": {**dict(msg.scene), **{k: list(v.sources) for k, v in msg.scene_series.items()}},
        "model": msg.model,
        "output_prefix": msg.output_prefix,
        "assets": dict(msg.assets),
        "labels": dict(msg.labels),
    }
    if msg.backend:
        data["backend"] = msg.backend
    for name in ("zoom", "dtype", "date", "priority", "precision"):
        if msg.HasField(name):
            data[name] = getattr(msg, name)
    if msg.HasField("bbox"):
        b = msg.bbox
        data["bbox"] = (b.min_lon, b.min_lat, b.max_lon, b.max_lat)
    return data


def spec_from_proto(msg: pb.JobSpec) -> JobSpec:
    """Validated JobSpec (pydantic.ValidationError if a value is out of range)."""
    return JobSpec.model_validate(spec_to_dict(msg))


# -- Job -----------------------------------------------------------------------------------------


def _progress_to_proto(p: Progress) -> pb.Progress:
    return pb.Progress(tiles_total=p.tiles_total, tiles_done=p.tiles_done, tiles_failed=p.tiles_failed)


def _progress_from_proto(m: pb.Progress) -> Progress:
    return Progress(tiles_total=m.tiles_total, tiles_done=m.tiles_done, tiles_failed=m.tiles_failed)


def _timings_to_proto(t: Timings) -> pb.Timings:
    msg = pb.Timings(created=datetime_to_proto(t.created))
    if t.started is not None:
        msg.started.CopyFrom(datetime_to_proto(t.started))
    if t.finished is not None:
        msg.finished.CopyFrom(datetime_to_proto(t.finished))
    return msg


def _timings_from_proto(m: pb.Timings) -> Timings:
    return Timings(
        created=datetime_from_proto(m.created),
        started=datetime_from_proto(m.started) if m.HasField("started") else None,
        finished=datetime_from_proto(m.finished) if m.HasField("finished") else None,
    )


def _error_to_proto(e: JobError) -> pb.JobError:
    msg = pb.JobError(
        message=e.message, tiles=[pb.TileFailure(tile=t.tile, reason=t.reason) for t in e.tiles]
    )
    if e.field is not None:
        msg.field = e.field
    return msg


def _error_from_proto(m: pb.JobError) -> JobError:
    return JobError(
        message=m.message,
        field=m.field if m.HasField("field") else None,
        tiles=[TileFailure(tile=t.tile, reason=t.reason) for t in m.tiles],
    )


def job_to_proto(job: Job) -> pb.Job:
    msg = pb.Job(
        id=job.id,
        state=state_to_proto(job.state),
        spec=spec_to_proto(job.spec),
        progress=_progress_to_proto(job.progress),
        timings=_timings_to_proto(job.timings),
        outputs=list(job.outputs),
    )
    if job.error is not None:
        msg.error.CopyFrom(_error_to_proto(job.error))
    return msg


def job_from_proto(msg: pb.Job) -> Job:
    return Job(
        id=msg.id,
        state=_required_state(msg.state),
        spec=spec_from_proto(msg.spec),
        progress=_progress_from_proto(msg.progress),
        timings=_timings_from_proto(msg.timings),
        outputs=list(msg.outputs),
        error=_error_from_proto(msg.error) if msg.HasField("error") else None,
    )


# -- JobEvent ------------------------------------------------------------------------------------


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=event.job_id,
        state=state_to_proto(event.state),
        progress=_progress_to_proto(event.progress),
        tiles_per_second=event.tiles_per_second,
        time=datetime_to_proto(event.time),
        message=event.message,
    )


def event_from_proto(msg: pb.JobEvent) -> JobEvent:
    return JobEvent(
        job_id=msg.job_id,
        state=_required_state(msg.state),
        progress=_progress_from_proto(msg.progress),
        tiles_per_second=msg.tiles_per_second,
        time=datetime_from_proto(msg.time),
        message=msg.message,
    )
