"""Job records as typed models. They mirror `protos/tilefm/v1/jobs.proto` field for field (a test
keeps them in step); the HTTP API speaks these, gRPC speaks the generated messages."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


#: allowed transitions; anything else is refused atomically by the store
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


class JobSpec(BaseModel):
    """What to run. Validated again, against real files and settings, before a job is accepted."""

    model_config = ConfigDict(extra="forbid")

    scene: Annotated[dict[str, str], Field(min_length=1, description="modality -> source (band folder, raster or STAC item)")]
    model: Annotated[str, Field(min_length=1, max_length=100)]
    output_prefix: Annotated[str, Field(min_length=1, description="s3://bucket/prefix/ or file:///dir/: the job writes <prefix>/<job id>/<model>.tif and its STAC item beside it")]
    zoom: Annotated[int | None, Field(ge=0, le=22)] = None
    bbox: tuple[float, float, float, float] | None = None
    backend: str = "auto"
    precision: Annotated[str | None, Field(description="model arithmetic: auto, fp32, fp16, bf16 (GPU backends) or int8 (onnxruntime on CPUs); absent: the workers' TILEFM_PRECISION")] = None
    dtype: str | None = None
    date: str | None = None
    assets: dict[str, str] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=0, le=9)] = 5
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("auto", "torch", "torch-cuda", "onnxruntime", "tensorrt"):
            raise ValueError("must be one of auto, torch, torch-cuda, onnxruntime, tensorrt")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str | None) -> str | None:
        if v is not None and v not in ("auto", "fp32", "fp16", "bf16", "int8"):
            raise ValueError("must be one of auto, fp32, fp16, bf16, int8")
        return v


def _utc_us(t: datetime) -> str:
    """Fixed-width UTC to the microsecond (lossless), so that times sort as strings: pydantic's own
    format drops the fraction when it is zero ('...:12Z' sorts after '...:12.083000Z')."""
    t = t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Timestamp = Annotated[datetime, PlainSerializer(_utc_us, return_type=str, when_used="json")]


class Progress(BaseModel):
    tiles_total: int = 0
    tiles_done: int = 0
    tiles_failed: int = 0


class Timings(BaseModel):
    created: Timestamp
    started: Timestamp | None = None
    finished: Timestamp | None = None


class TileFailure(BaseModel):
    tile: str  # z/x/y
    reason: str


class JobError(BaseModel):
    message: str
    field: str | None = None
    tiles: list[TileFailure] = Field(default_factory=list)


class Job(BaseModel):
    id: str
    state: JobState
    spec: JobSpec
    progress: Progress = Field(default_factory=Progress)
    timings: Timings
    outputs: list[str] = Field(default_factory=list)
    error: JobError | None = None


class JobEvent(BaseModel):
    job_id: str
    state: JobState
    progress: Progress
    tiles_per_second: float = 0.0
    time: Timestamp
    message: str = ""
