"""The pydantic job models and protos/tilefm/v1/jobs.proto describe the same records: same field
names, compatible types, presence where the model has None; conversions round-trip exactly."""

from __future__ import annotations

import enum
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import BaseModel

from tilefm.jobs import proto as conv
from tilefm.jobs.models import Job, JobError, JobEvent, JobSpec, JobState, Progress, TileFailure, Timings
from tilefm.jobs.proto import pb

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "protos"

#: every pydantic model of the job API and its message
PAIRS: list[tuple[type[BaseModel], Descriptor]] = [
    (JobSpec, pb.JobSpec.DESCRIPTOR),
    (Progress, pb.Progress.DESCRIPTOR),
    (Timings, pb.Timings.DESCRIPTOR),
    (TileFailure, pb.TileFailure.DESCRIPTOR),
    (JobError, pb.JobError.DESCRIPTOR),
    (Job, pb.Job.DESCRIPTOR),
    (JobEvent, pb.JobEvent.DESCRIPTOR),
]

#: proto fields that carry another form of a model field: a modality's list of sources (a time
#: series) in JobSpec.scene goes in scene_series, a map to SourceList messages
OTHER_FORMS: dict[str, dict[str, str]] = {"JobSpec": {"scene_series": "scene"}}

INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
}
FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _check_scalar(tp: typing.Any, fd: FieldDescriptor, where: str) -> None:
    """`tp` (one element's type) is compatible with `fd` (ignoring its label)."""
    origin = typing.get_origin(tp)
    if tp is str:
        assert fd.type == FieldDescriptor.TYPE_STRING, f"{where}: str needs a string field"
    elif tp is bool:
        assert fd.type == FieldDescriptor.TYPE_BOOL, f"{where}: bool needs a bool field"
    elif tp is int:
        assert fd.type in INT_TYPES, f"{where}: int needs an integer field"
    elif tp is float:
        assert fd.type in FLOAT_TYPES, f"{where}: float needs a double or float field"
    elif tp is datetime:
        assert fd.type == FieldDescriptor.TYPE_MESSAGE, f"{where}: datetime needs a message"
        assert fd.message_type.full_name == "google.protobuf.Timestamp", (
            f"{where}: datetime needs a Timestamp"
        )
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        assert fd.type == FieldDescriptor.TYPE_ENUM, f"{where}: {tp.__name__} needs an enum"
        prefix = "JOB_STATE_"  # the style guide's prefix: the enum's name in UPPER_SNAKE
        proto_values = {v.name for v in fd.enum_type.values}
        model_values = {prefix + m.name for m in tp}
        assert proto_values - model_values == {prefix + "UNSPECIFIED"}, f"{where}: enum values differ"
        assert fd.enum_type.values_by_number[0].name == prefix + "UNSPECIFIED"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        assert fd.type == FieldDescriptor.TYPE_MESSAGE, f"{where}: {tp.__name__} needs a message"
        assert fd.message_type.name == tp.__name__, f"{where}: {tp.__name__} vs {fd.message_type.name}"
        assert (tp, fd.message_type) in [(m, d) for m, d in PAIRS], f"{where}: {tp.__name__} not in PAIRS"
    elif origin is tuple:
        # a fixed-size tuple of numbers is a message with one field per element (bbox -> BBox)
        args = typing.get_args(tp)
        assert fd.type == FieldDescriptor.TYPE_MESSAGE, f"{where}: a tuple needs a message"
        sub = fd.message_type.fields
        assert len(sub) == len(args) and Ellipsis not in args, f"{where}: tuple arity"
        for i, (arg, sfd) in enumerate(zip(args, sub, strict=True)):
            assert not sfd.is_repeated
            _check_scalar(arg, sfd, f"{where}[{i}]={sfd.name}")
    else:
        raise AssertionError(f"{where}: no rule for the type {tp!r}; extend this test")


def _check_field(model: type[BaseModel], name: str, fd: FieldDescriptor) -> None:
    where = f"{model.__name__}.{name}"
    info = model.model_fields[name]
    tp = info.annotation
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1, f"{where}: only `X | None` unions are supported"
        tp = rest[0]
        if typing.get_origin(tp) is typing.Annotated:  # e.g. Timestamp: a datetime with a JSON format
            tp = typing.get_args(tp)[0]
        # absent and set must stay distinguishable
        assert fd.has_presence and not fd.is_repeated, f"{where} may be None: the proto field needs presence"
    elif fd.has_presence and fd.type != FieldDescriptor.TYPE_MESSAGE:
        # `optional` scalar: absent must mean the model's default
        assert not info.is_required(), f"{where}: proto `optional` but the model requires it"
    origin = typing.get_origin(tp)
    if origin is dict:
        k, v = typing.get_args(tp)
        assert _is_map(fd), f"{where}: a dict needs a map"
        _check_scalar(k, fd.message_type.fields_by_name["key"], where + ".key")
        if typing.get_origin(v) is typing.Annotated:  # a value with validators of its own
            v = typing.get_args(v)[0]
        if typing.get_origin(v) in (typing.Union, types.UnionType):
            # one source or a list of them: the list form in the other-form map, as a message
            # holding one repeated field of the element type
            one, many = typing.get_args(v)
            assert typing.get_origin(many) is list, f"{where}: only `X | list[X]` map values are supported"
            other = next(o for o, n in OTHER_FORMS.get(model.__name__, {}).items() if n == name)
            ofd = fd.containing_type.fields_by_name[other]
            assert _is_map(ofd), f"{where}: {other} needs to be a map"
            inner = ofd.message_type.fields_by_name["value"]
            assert inner.type == FieldDescriptor.TYPE_MESSAGE and len(inner.message_type.fields) == 1, (
                f"{where}: {other}'s value"
            )
            (elem,) = inner.message_type.fields
            assert elem.is_repeated, f"{where}: {other}'s value needs a repeated field"
            _check_scalar(typing.get_args(many)[0], elem, f"{where}[]")
            v = one
        _check_scalar(v, fd.message_type.fields_by_name["value"], where + ".value")
    elif origin is list:
        (elem,) = typing.get_args(tp)
        assert fd.is_repeated and not _is_map(fd), f"{where}: a list needs a repeated field"
        _check_scalar(elem, fd, where + "[]")
    else:
        assert not fd.is_repeated, f"{where}: a single value cannot be a repeated field"
        _check_scalar(tp, fd, where)


@pytest.mark.parametrize(("model", "desc"), PAIRS, ids=[m.__name__ for m, _ in PAIRS])
def test_fields_match(model: type[BaseModel], desc: Descriptor) -> None:
    model_fields = set(model.model_fields)
    proto_fields = set(desc.fields_by_name) - set(OTHER_FORMS.get(model.__name__, {}))
    assert model_fields - proto_fields == set(), f"{model.__name__}: fields missing in the proto"
    assert proto_fields - model_fields == set(), f"{desc.full_name}: fields missing in the model"
    for name in sorted(model_fields):
        _check_field(model, name, desc.fields_by_name[name])


def test_every_message_of_the_file_is_covered() -> None:
    """New messages need a model (or to be request/response wrappers of the service)."""
    covered = {d.name for _, d in PAIRS} | {"BBox", "SourceList"}
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    wrappers = {m.input_type.name for m in service.methods} | {m.output_type.name for m in service.methods}
    assert set(pb.DESCRIPTOR.message_types_by_name) - covered - wrappers == set()


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Submit", "Get", "List", "Cancel", "Watch"}
    assert methods["Get"].output_type is pb.Job.DESCRIPTOR
    assert methods["Cancel"].output_type is pb.Job.DESCRIPTOR
    assert methods["Watch"].output_type is pb.JobEvent.DESCRIPTOR
    assert methods["Watch"].server_streaming and not methods["Watch"].client_streaming
    assert not any(m.server_streaming for n, m in methods.items() if n != "Watch")
    assert pb.DESCRIPTOR.package == "tilefm.v1"
    assert pb.DESCRIPTOR.name == "tilefm/v1/jobs.proto"  # canonical file name, as other languages see it


def test_every_element_is_documented() -> None:
    """Each message, field, enum value and rpc in protos/ carries a comment."""
    grpc_tools = pytest.importorskip("grpc_tools")
    import importlib.resources
    import tempfile

    from grpc_tools import protoc

    files = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        rc = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"-I{importlib.resources.files(grpc_tools) / '_proto'}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        assert rc == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    undocumented = []
    for f in fds.file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}

        def need(path: tuple[int, ...], name: str, _c: dict = comments, _file: str = f.name) -> None:
            if not _c.get(path):
                undocumented.append(f"{_file}: {name}")

        # field numbers of FileDescriptorProto / DescriptorProto / ... (descriptor.proto)
        for i, m in enumerate(f.message_type):
            is_wrapper = m.name.endswith(("Request", "Response"))  # documented by their rpc
            if not is_wrapper:
                need((4, i), m.name)
            for j, fld in enumerate(m.field):
                need((4, i, 2, j), f"{m.name}.{fld.name}")
        for i, e in enumerate(f.enum_type):
            need((5, i), e.name)
            for j, v in enumerate(e.value):
                need((5, i, 2, j), f"{e.name}.{v.name}")
        for i, s in enumerate(f.service):
            need((6, i), s.name)
            for j, rpc in enumerate(s.method):
                need((6, i, 2, j), f"{s.name}.{rpc.name}")
    assert undocumented == [], f"elements without a comment: {undocumented}"


# -- round trips ---------------------------------------------------------------------------------

T0 = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)

FULL_SPEC = JobSpec(
    scene={"s2": "/data/scene/", "s1": "s3://b/s1.tif"},
    model="ukis-csmask",
    output_prefix="s3://bucket/out/",
    zoom=0,  # a set zero must stay set
    bbox=(-8.5, 31.25, -8.0, 31.75),
    backend="onnxruntime",
    dtype="float16",
    date="2020-02-19",
    assets={"B02": "blue", "B03": "green"},
    priority=0,  # a set zero must stay 0, not become the default 5
    labels={"team": "eo", "ticket": "42"},
)
MIN_SPEC = JobSpec(scene={"s2": "/data/scene/"}, model="m", output_prefix="file:///tmp/out/")


@pytest.mark.parametrize(
    "spec",
    [FULL_SPEC, MIN_SPEC, MIN_SPEC.model_copy(update={"bbox": (0.0, 0.0, 0.0, 0.0)})],
    ids=["full", "minimal", "zero-bbox"],
)
def test_spec_round_trip(spec: JobSpec) -> None:
    msg = conv.spec_to_proto(spec)
    back = conv.spec_from_proto(pb.JobSpec.FromString(msg.SerializeToString()))
    assert back == spec
    assert back.model_dump() == spec.model_dump()


def test_spec_absent_fields_take_the_model_defaults() -> None:
    msg = pb.JobSpec(scene={"s2": "/x"}, model="m", output_prefix="file:///o/")
    for name in ("zoom", "dtype", "date", "priority", "bbox"):
        assert not msg.HasField(name)
    spec = conv.spec_from_proto(msg)
    assert spec == JobSpec(scene={"s2": "/x"}, model="m", output_prefix="file:///o/")
    assert (spec.zoom, spec.bbox, spec.dtype, spec.date, spec.priority, spec.backend) == (
        None,
        None,
        None,
        None,
        5,
        "auto",
    )
    msg = conv.spec_to_proto(spec)
    assert not any(msg.HasField(n) for n in ("zoom", "dtype", "date", "bbox"))
    msg = conv.spec_to_proto(FULL_SPEC)
    assert all(msg.HasField(n) for n in ("zoom", "dtype", "date", "bbox", "priority"))
    assert msg.zoom == 0 and msg.priority == 0


def test_spec_from_proto_validates() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="zoom"):
        conv.spec_from_proto(pb.JobSpec(scene={"s2": "/x"}, model="m", output_prefix="file:///o/", zoom=23))
    with pytest.raises(ValidationError, match="backend"):
        conv.spec_from_proto(
            pb.JobSpec(scene={"s2": "/x"}, model="m", output_prefix="file:///o/", backend="cuda")
        )


def _jobs() -> list[Job]:
    base = Job(
        id="0190f1a2b3c4" + "0" * 20, state=JobState.QUEUED, spec=MIN_SPEC, timings=Timings(created=T0)
    )
    full = Job(
        id="0190f1a2b3c4" + "f" * 20,
        state=JobState.FAILED,
        spec=FULL_SPEC,
        progress=Progress(tiles_total=120, tiles_done=117, tiles_failed=3),
        timings=Timings(
            created=T0,
            started=T0 + timedelta(seconds=1.5),
            finished=T0 + timedelta(minutes=3, microseconds=1),
        ),
        outputs=["s3://bucket/out/ukis-csmask.tif", "s3://bucket/out/ukis-csmask.json"],
        error=JobError(
            message="3 tiles failed",
            field=None,
            tiles=[
                TileFailure(tile="11/970/850", reason="NaN output"),
                TileFailure(tile="11/971/850", reason="x"),
            ],
        ),
    )
    with_field = base.model_copy(
        update={"state": JobState.FAILED, "error": JobError(message="no such band", field="scene.s2")}
    )
    empty_field = base.model_copy(update={"state": JobState.FAILED, "error": JobError(message="m", field="")})
    return [base, full, with_field, empty_field] + [base.model_copy(update={"state": s}) for s in JobState]


@pytest.mark.parametrize("job", _jobs())
def test_job_round_trip(job: Job) -> None:
    msg = conv.job_to_proto(job)
    back = conv.job_from_proto(pb.Job.FromString(msg.SerializeToString()))
    assert back == job
    assert back.timings.created.tzinfo is not None
    assert msg.HasField("error") == (job.error is not None)
    assert msg.timings.HasField("started") == (job.timings.started is not None)
    assert msg.timings.HasField("finished") == (job.timings.finished is not None)


def test_event_round_trip() -> None:
    for state in JobState:
        ev = JobEvent(
            job_id="abc",
            state=state,
            progress=Progress(tiles_total=9, tiles_done=4),
            tiles_per_second=2.75,
            time=T0,
            message=f"now {state.value}",
        )
        assert (
            conv.event_from_proto(pb.JobEvent.FromString(conv.event_to_proto(ev).SerializeToString())) == ev
        )


def test_timestamps() -> None:
    # a naive datetime is taken as UTC; another zone comes back as the same instant in UTC
    naive = datetime(2024, 1, 2, 3, 4, 5, 678901)
    assert conv.datetime_from_proto(conv.datetime_to_proto(naive)) == naive.replace(tzinfo=UTC)
    cet = datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=1)))
    back = conv.datetime_from_proto(conv.datetime_to_proto(cet))
    assert back == cet and back.utcoffset() == timedelta(0)
    before_epoch = datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)
    assert conv.datetime_from_proto(conv.datetime_to_proto(before_epoch)) == before_epoch


def test_states() -> None:
    assert conv.state_from_proto(pb.JOB_STATE_UNSPECIFIED) is None
    assert conv.state_to_proto(None) == pb.JOB_STATE_UNSPECIFIED
    for s in JobState:
        assert conv.state_from_proto(conv.state_to_proto(s)) is s
        assert pb.JobState.Name(conv.state_to_proto(s)) == f"JOB_STATE_{s.name}"
    with pytest.raises(ValueError):
        conv.state_from_proto(99)
    with pytest.raises(ValueError):
        conv.job_from_proto(conv.job_to_proto(_jobs()[0]).__class__(state=pb.JOB_STATE_UNSPECIFIED))


def test_json_times_are_fixed_width_and_sort_as_strings() -> None:
    from datetime import UTC, datetime

    from tilefm.jobs.models import Timings

    whole = datetime(2026, 11, 25, 15, 16, 12, tzinfo=UTC)
    later = whole.replace(microsecond=83_000)
    a, b = (Timings(created=t).model_dump(mode="json")["created"] for t in (whole, later))
    assert (a, b) == ("2026-11-25T15:16:12.000000Z", "2026-11-25T15:16:12.083000Z")
    assert sorted([b, a]) == [a, b]
    # and they read back as the same instants
    assert Timings.model_validate({"created": b}).created == later
