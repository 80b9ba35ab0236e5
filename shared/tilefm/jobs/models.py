"""Job records as typed models. They mirror `protos/tilefm/v1/jobs.proto` field for field (a test
keeps them in step); the HTTP API speaks these, gRPC speaks the generated messages."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime
from datetime import date as _date
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, field_validator


class JobState(enum.StrEnum):
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


#: limits on what one job may name: a request over any of them is refused (422 / INVALID_ARGUMENT)
#: naming the field, before anything is opened or stored
MAX_MODALITIES = 8  # sources of one scene (the model cards read at most three)
MAX_SOURCES = 64  # sources of one modality, a time series (the models take at most 24 dates)
MAX_ASSETS = 64  # asset renames (a band each)
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256
MAX_KEY_CHARS = 64  # a modality or asset name
MAX_PATH_BYTES = 4096  # a path or URI, UTF-8 (Linux PATH_MAX)
MAX_NAME_BYTES = 255  # one component of it (NAME_MAX): longer ones fail deep in the OS otherwise


def check_location(value: str) -> str:
    """A path or URI a job reads or writes, bounded the way file systems bound them.

    Args:
        value: the path or URI.

    Returns:
        `value` unchanged.

    Raises:
        ValueError: empty, over `MAX_PATH_BYTES`, or with a component over `MAX_NAME_BYTES`.
    """
    size = len(_utf8(value))
    if not value:
        raise ValueError("must not be empty")
    if size > MAX_PATH_BYTES:
        raise ValueError(f"is {size} bytes long, over the limit of {MAX_PATH_BYTES}")
    longest = max(len(part.encode()) for part in value.split("/"))
    if longest > MAX_NAME_BYTES:
        raise ValueError(f"has a path component of {longest} bytes, over the limit of {MAX_NAME_BYTES}")
    return value


def _utf8(text: str) -> bytes:
    """`text` as UTF-8; ValueError for a lone surrogate (JSON lets one through as `\\ud800`, and it
    could be neither stored nor sent back)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None


def _sources(value: Any) -> Any:
    """A modality's sources as given: one (a string) or a list of them (a time series), with
    an error naming the modality for anything else (before pydantic tries each form)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a source (a string) or a list of sources (a time series)")
    if not value:
        raise ValueError("must name at least one source")
    if len(value) > MAX_SOURCES:
        raise ValueError(f"names {len(value)} sources, over the limit of {MAX_SOURCES}")
    return value


#: one modality's source, or its sources: a time series, one acquisition date each
Sources = Annotated[str | list[str], BeforeValidator(_sources)]


def check_sources(value: str | list[str]) -> str | list[str]:
    """`check_location` on a source, or on each of a list of them."""
    for i, source in enumerate([value] if isinstance(value, str) else value):
        try:
            check_location(source)
        except ValueError as e:
            raise ValueError(f"{e}" if isinstance(value, str) else f"source {i} {e}") from None
    return value


def _check_mapping(
    values: dict[str, Any], *, key_chars: int, value_check: Callable[[Any], object]
) -> dict[str, Any]:
    """Every key 1 to `key_chars` characters, every value passing `value_check`; the error names the key."""
    for key, value in values.items():
        try:
            _utf8(key)
        except ValueError as e:
            raise ValueError(f"a key {e}") from None
        if not 0 < len(key) <= key_chars:
            raise ValueError(f"key {key[:80]!r} must be 1 to {key_chars} characters")
        try:
            value_check(value)
        except ValueError as e:
            raise ValueError(f"the value of {key[:80]!r} {e}") from None
    return values


def _label_value(value: str) -> str:
    _utf8(value)
    if len(value) > MAX_LABEL_VALUE_CHARS:
        raise ValueError(f"is {len(value)} characters long, over the limit of {MAX_LABEL_VALUE_CHARS}")
    return value


class JobSpec(BaseModel):
    """What to run. Validated again, against real files and settings, before a job is accepted.

    Numbers are strict (no `true` or `"7"` for a zoom or a priority), the bbox must be a real,
    non-inverted lon/lat box, and every collection, name and path is bounded (the `MAX_*` limits
    above)."""

    model_config = ConfigDict(extra="forbid")

    scene: Annotated[
        dict[str, Sources],
        Field(
            min_length=1,
            max_length=MAX_MODALITIES,
            description="modality -> source (band folder, raster, STAC item or ItemCollection), "
            "or a list of sources: a time series, one acquisition date each",
        ),
    ]
    model: Annotated[str, Field(min_length=1, max_length=100)]
    output_prefix: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_PATH_BYTES,
            description=(
                "s3://bucket/prefix/ or file:///dir/: the job writes <prefix>/<job id>/<model>.tif and its "
                "STAC item beside it"
            ),
        ),
    ]
    zoom: Annotated[int | None, Field(ge=0, le=22, strict=True)] = None
    bbox: Annotated[
        tuple[float, float, float, float] | None,
        Field(
            description=(
                "minlon, minlat, maxlon, maxlat in WGS84 degrees: finite, -180..180 and -90..90, min <= max"
            )
        ),
    ] = None
    backend: str = "auto"
    precision: Annotated[
        str | None,
        Field(
            description=(
                "model arithmetic: auto, fp32, fp16, bf16 (GPU backends) or int8 (onnxruntime on CPUs); "
                "absent: the workers' TILEFM_PRECISION"
            )
        ),
    ] = None
    dtype: Annotated[str | None, Field(max_length=16)] = None
    date: Annotated[str | None, Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", description="YYYY-MM-DD")] = (
        None
    )
    assets: Annotated[dict[str, str], Field(max_length=MAX_ASSETS)] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=0, le=9, strict=True)] = 5
    labels: Annotated[dict[str, str], Field(max_length=MAX_LABELS)] = Field(default_factory=dict)

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

    @field_validator("bbox", mode="before")
    @classmethod
    def _bbox_numbers(cls, v: Any) -> Any:
        # JSON numbers only: pydantic would otherwise take true as 1.0 and "1" as 1.0
        if isinstance(v, list | tuple) and any(
            isinstance(x, bool) or not isinstance(x, int | float) for x in v
        ):
            raise ValueError("must be four numbers minlon, minlat, maxlon, maxlat")
        return v

    @field_validator("bbox")
    @classmethod
    def _bbox_range(
        cls, v: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        from tilefm.errors import BBoxError
        from tilefm.grid import check_bbox  # the CLI's own check (grid imports the geo stack: lazily)

        if v is None:
            return v
        try:
            # zero-size boxes pass here; planning refuses them as not intersecting the scene
            return check_bbox(v, allow_empty=True)
        except BBoxError as e:
            raise ValueError(Exception.__str__(e)) from None

    @field_validator("date")
    @classmethod
    def _date(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                _date.fromisoformat(v)
            except ValueError:
                raise ValueError(f"{v!r} is not a calendar date (YYYY-MM-DD)") from None
        return v

    @field_validator("model", "dtype")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        if v is not None:
            _utf8(v)
        return v

    @field_validator("scene")
    @classmethod
    def _scene_locations(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        return _check_mapping(v, key_chars=MAX_KEY_CHARS, value_check=check_sources)

    @field_validator("assets")
    @classmethod
    def _locations(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_mapping(v, key_chars=MAX_KEY_CHARS, value_check=check_location)

    def sources(self) -> list[tuple[str, str]]:
        """(field, source) for every source of the scene: `scene.MODALITY` for each of a
        modality's sources."""
        return [
            (f"scene.{m}", s)
            for m, given in self.scene.items()
            for s in ([given] if isinstance(given, str) else given)
        ]

    @field_validator("output_prefix")
    @classmethod
    def _output_prefix(cls, v: str) -> str:
        return check_location(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_mapping(v, key_chars=MAX_LABEL_KEY_CHARS, value_check=_label_value)


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
