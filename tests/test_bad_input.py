"""Bad input, generated and by hand, against both front ends of the job API: whatever is sent, the
answer is a 4xx (gRPC: INVALID_ARGUMENT or another caller's-fault code) that names the field,
never a 5xx / INTERNAL / UNKNOWN, and never a hang.

HTTP (in process):
- schemathesis from the OpenAPI document, both generation modes, on the /v1/jobs operations;
- hypothesis job specs with NaN, infinities, huge and boundary numbers, booleans and strings where
  numbers go, unicode, lone surrogates, very long strings and paths, too many labels / modalities;
- hypothesis query strings and job ids;
- a matrix of raw bodies: malformed, nested past the parser's limit, over the size limit (whole
  or chunked), wrong content types.

gRPC (a real server on 127.0.0.1, authentication off: it has its own tests):
- a matrix of bad fields for every method, each INVALID_ARGUMENT with the field in the trailing
  metadata `tilefm-field`, and bytes that are not a valid message;
- hypothesis JobSpec messages over the whole range of their wire types.

Cases are counted by kind; the counts are written to test-output/bad-input-cases.json.
`TILEFM_BAD_INPUT_EXAMPLES` scales the generated ones (default 1: about 1,800 cases in all, ~30 s).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import quote

import grpc
import pytest
import schemathesis
from conftest import OUTPUT_DIR, drop_redis_keys, settings_from
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tilefm.api.auth import KeyRing, hash_key
from tilefm.api.grpc_service import FIELD_METADATA_KEY, MAX_TOKEN_CHARS, create_server
from tilefm.api.jobs import create_app
from tilefm.jobs.models import (
    MAX_ASSETS,
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_MODALITIES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
)
from tilefm.jobs.proto import pb, pb_grpc
from tilefm.jobs.service import JobService
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings

KEY = "bad-input-" + uuid.uuid4().hex
PREFIX = f"tilefm-bad-input-{uuid.uuid4().hex[:8]}:"
#: scenes and outputs may only be in this empty folder: nothing real is read or written
EMPTY = "/tmp/tilefm-bad-input-empty"
MAX_BODY = 64 * 1024  # small, so that over-limit bodies are cheap to send
SCALE = float(os.environ.get("TILEFM_BAD_INPUT_EXAMPLES", "1"))
#: a call taking longer than this is a hang
CALL_TIMEOUT_S = 30
CASES: Counter[str] = Counter()

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _examples(n: int) -> int:
    return max(1, int(n * SCALE))


def _settings(**env: str) -> Settings:
    return settings_from(env)


SERVICE_SETTINGS = _settings(
    TILEFM_REDIS_PREFIX=PREFIX,
    TILEFM_API_KEYS=json.dumps(
        [{"name": "bad-input", "sha256": hash_key(KEY), "scopes": ["jobs:read", "jobs:write"]}]
    ),
    TILEFM_ALLOWED_SOURCES=json.dumps([EMPTY]),
    TILEFM_ALLOWED_OUTPUTS=json.dumps([f"file://{EMPTY}/"]),
    TILEFM_API_MAX_BODY_BYTES=str(MAX_BODY),
)
APP = create_app(SERVICE_SETTINGS)
AUTH = {"Authorization": f"Bearer {KEY}"}
#: a spec of the right shape that names a scene that is not there (422 on `scene` at the end)
BASE_SPEC: dict[str, Any] = {
    "scene": {"s2": f"{EMPTY}/scene"},
    "model": "ukis-csmask",
    "output_prefix": f"file://{EMPTY}/out/",
    "zoom": 11,
}

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bad-input")


def _within_time(fn: Callable[[], Any], where: str) -> Any:
    try:
        return _pool.submit(fn).result(timeout=CALL_TIMEOUT_S)
    except FutureTimeout:
        raise AssertionError(f"no answer within {CALL_TIMEOUT_S} s: {where}") from None


@pytest.fixture(scope="module", autouse=True)
def _around() -> Iterator[None]:
    os.makedirs(EMPTY, exist_ok=True)
    yield
    drop_redis_keys(PREFIX)
    OUTPUT_DIR.mkdir(exist_ok=True)
    counts = {**dict(sorted(CASES.items())), "total": sum(CASES.values())}
    # under pytest-xdist (`make test-fast`) each worker counts the cases it ran
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"bad-input-cases.{worker}.json" if worker else "bad-input-cases.json"
    (OUTPUT_DIR / name).write_text(json.dumps(counts, indent=1) + "\n")
    print(f"\nbad-input cases: {counts}")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(APP, raise_server_exceptions=False) as c:
        yield c


# ------------------------------------------------------------------------------------------------
# HTTP: what every answer must look like
# ------------------------------------------------------------------------------------------------

#: 4xx statuses that are about the request's content: the body must name the field
FIELD_STATUSES = {400, 413, 422}


def check_http(status: int, text: str, where: str) -> None:
    """No 5xx; a 4xx is the services' error body, naming the field where the request's content
    is at fault (400 / 413 / 422, and a 404 for a job id that routed)."""
    assert status < 500, f"{status} for {where}: {text[:500]}"
    if status < 400:
        return
    body = json.loads(text)
    error = body["error"]
    assert error["status"] == status and error["message"], (where, body)
    if status in FIELD_STATUSES:
        assert error["field"], f"{status} without a field for {where}: {body}"
    if status == 404 and error["message"] != "Not Found":  # "Not Found": no route matched the path
        assert error["field"] == "id", (where, body)


def _post_spec(client: TestClient, body: bytes, kind: str) -> None:
    CASES[kind] += 1
    r = _within_time(
        lambda: client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"}),
        f"POST /v1/jobs {body[:200]!r}",
    )
    check_http(r.status_code, r.text, f"POST /v1/jobs {body[:300]!r}")
    assert r.status_code != 202, f"accepted: {body[:300]!r}"


# ------------------------------------------------------------------------------------------------
# HTTP: schemathesis
# ------------------------------------------------------------------------------------------------

schema = schemathesis.openapi.from_asgi("/openapi.json", APP).include(path_regex="^/v1/jobs")


@schema.parametrize()
@settings(max_examples=_examples(40), **SETTINGS)
def test_schemathesis_job_routes(case) -> None:
    CASES["http.schemathesis"] += 1
    response = _within_time(lambda: case.call(headers=AUTH), f"{case.method} {case.formatted_path}")
    check_http(
        response.status_code,
        response.text,
        f"{case.method} {case.formatted_path} {case.query} {str(case.body)[:300]}",
    )


# ------------------------------------------------------------------------------------------------
# HTTP: generated job specs
# ------------------------------------------------------------------------------------------------

SPECIAL_NUMBERS = [
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0,
    -1,
    1,
    9,
    10,
    22,
    23,
    180,
    180.0000001,
    -180.0000001,
    90.0000001,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**40,
    True,
    False,
    11.5,
    1e-300,
]
SPECIAL_STRINGS = [
    "",
    " ",
    "\x00",
    "\x1f",
    "\ud800",
    "\udfff",
    "\u202e",
    "\ufeff",
    "é",
    "💥",
    "7",
    "11",
    "true",
    "null",
    "NaN",
    "Infinity",
    "1e400",
    "auto",
    "fp32",
    "float16",
    "2020-02-19",
    "2020-02-30",
    "2020-13-01",
    "20200219",
    "2020-02-19T00:00:00",
    "٢٠٢٠-٠٢-١٩",
    "../../etc/passwd",
    "s3://",
    "file://",
    "file:///",
    "s3://tilefm/x/",
    f"{EMPTY}/scene",
    "/" + "a" * (MAX_NAME_BYTES + 1),
    "/" + "é" * (MAX_NAME_BYTES // 2 + 1),
    "/a" * (MAX_PATH_BYTES // 2 + 1),
    "k" * (MAX_LABEL_KEY_CHARS + 1),
    "v" * (MAX_LABEL_VALUE_CHARS + 1),
    "%00",
    "%2e%2e/",
    "\\\\server\\share",
    "C:\\x",
    "~root/x",
]

numbers = st.sampled_from(SPECIAL_NUMBERS) | st.integers() | st.floats()
long_strings = st.builds(
    lambda c, n: c * n, st.sampled_from(["a", "é", "丁", "/", "💥", "\ud800", "/x"]), st.integers(100, 6000)
)
strings = st.sampled_from(SPECIAL_STRINGS) | st.text(max_size=40) | long_strings
json_values = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
string_maps = st.dictionaries(strings, strings, max_size=MAX_LABELS + 8)
FIELD_VALUES: dict[str, st.SearchStrategy] = {
    "zoom": numbers | json_values,
    "priority": numbers | json_values,
    "bbox": st.lists(numbers | strings, min_size=0, max_size=6) | json_values,
    "scene": st.dictionaries(strings, strings | json_values, max_size=MAX_MODALITIES + 4) | json_values,
    "assets": st.dictionaries(strings, strings, max_size=MAX_ASSETS + 4) | json_values,
    "labels": string_maps | json_values,
}
FIELDS = [
    "scene",
    "model",
    "output_prefix",
    "zoom",
    "bbox",
    "backend",
    "precision",
    "dtype",
    "date",
    "assets",
    "priority",
    "labels",
    "no_such_field",
]
mutation = st.sampled_from(FIELDS).flatmap(
    lambda f: st.tuples(st.just(f), FIELD_VALUES.get(f, strings | json_values))
)
bad_specs = st.lists(mutation, min_size=1, max_size=3).map(lambda ms: {**BASE_SPEC, **dict(ms)})
partial_specs = st.sets(st.sampled_from(sorted(BASE_SPEC)), max_size=3).map(
    lambda drop: {k: v for k, v in BASE_SPEC.items() if k not in drop}
)


def _dumps(body: Any) -> bytes:
    # Python's json writes NaN / Infinity as the bare tokens, which its parser (the API's) reads
    return json.dumps(body, allow_nan=True).encode()


@given(spec=bad_specs)
@settings(max_examples=_examples(450), **SETTINGS)
def test_http_generated_specs(client: TestClient, spec: dict) -> None:
    _post_spec(client, _dumps(spec), "http.specs")


@given(spec=partial_specs, extra=st.dictionaries(st.text(max_size=20), json_values, max_size=3))
@settings(max_examples=_examples(60), **SETTINGS)
def test_http_specs_missing_fields(client: TestClient, spec: dict, extra: dict) -> None:
    _post_spec(client, _dumps({**spec, **extra}), "http.partial-specs")


@given(bbox=st.lists(st.floats() | st.sampled_from(SPECIAL_NUMBERS), min_size=4, max_size=4))
@settings(max_examples=_examples(120), **SETTINGS)
def test_http_bboxes(client: TestClient, bbox: list) -> None:
    """Every bbox (none of them on the empty scene) is refused; the unusable ones as `bbox`."""
    CASES["http.bbox"] += 1
    body = _dumps({**BASE_SPEC, "bbox": bbox})
    r = _within_time(
        lambda: client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"}),
        f"bbox {bbox}",
    )
    check_http(r.status_code, r.text, f"bbox {bbox}")
    w, s, e, n = bbox
    usable = all(isinstance(v, float | int) and not isinstance(v, bool) for v in bbox) and (
        -180 <= w <= e <= 180 and -90 <= s <= n <= 90
    )
    if not usable:
        assert (r.status_code, r.json()["error"]["field"]) == (422, "bbox"), (bbox, r.text)


def _quote(text: str) -> str:
    # cut to what a URL holds: the client refuses one over 64 KiB, and three parameters of 1500
    # four-byte characters are 54 KiB percent-encoded
    return quote(text[:1500].encode("utf-8", "surrogatepass"), safe="")


@given(
    params=st.dictionaries(
        st.sampled_from(["limit", "cursor", "state", "x"]), strings | numbers.map(str), max_size=3
    )
)
@settings(max_examples=_examples(120), **SETTINGS)
def test_http_list_queries(client: TestClient, params: dict) -> None:
    CASES["http.list-query"] += 1
    # percent-encoded by hand: a lone surrogate goes out as the bytes it would be, not UTF-8
    query = "&".join(f"{k}={_quote(v)}" for k, v in params.items())
    r = _within_time(lambda: client.get(f"/v1/jobs?{query}", headers=AUTH), f"GET /v1/jobs {params}")
    check_http(r.status_code, r.text, f"GET /v1/jobs {params}")


@given(
    job_id=strings,
    method=st.sampled_from(["GET", "DELETE", "POST"]),
    suffix=st.sampled_from(["", ":cancel", "/events"]),
)
@settings(max_examples=_examples(80), **SETTINGS)
def test_http_job_ids(client: TestClient, job_id: str, method: str, suffix: str) -> None:
    CASES["http.job-id"] += 1
    path = "/v1/jobs/" + _quote(job_id) + suffix
    r = _within_time(lambda: client.request(method, path, headers=AUTH), f"{method} {path[:200]}")
    check_http(r.status_code, r.text, f"{method} {path[:200]}")


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"model": "'
    for _ in range(total // 4096):
        yield b"a" * 4096
    yield b'"}'


RAW_BODIES: dict[str, tuple[bytes | Callable[[], Iterator[bytes]], str, int]] = {
    # name: (body, content type, expected status)
    "empty": (b"", "application/json", 422),
    "truncated": (b'{"scene": {"s2": ', "application/json", 400),
    "not-json": (b"scene=s2", "application/json", 400),
    "null": (b"null", "application/json", 422),
    "list": (b"[]", "application/json", 422),
    "string": (b'"spec"', "application/json", 422),
    "number": (b"1e999", "application/json", 422),
    "bare-nan": (b"NaN", "application/json", 422),
    "deeply-nested-list": (b"[" * 20_000 + b"]" * 20_000, "application/json", 400),
    "deeply-nested-object": (b'{"a":' * 8_000 + b"1" + b"}" * 8_000, "application/json", 400),
    "nested-in-a-field": (
        _dumps({**BASE_SPEC, "labels": {"a": "b"}})[:-1] + b', "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "application/json",
        400,
    ),
    "invalid-utf8": (
        b'{"model": "\xff\xfe", "scene": {"s2": "/x"}, "output_prefix": "file:///x/"}',
        "application/json",
        400,
    ),
    "utf16": (
        json.dumps(BASE_SPEC).encode("utf-16"),
        "application/json",
        422,
    ),  # JSON may be UTF-16: the scene
    "bom": (b"\xef\xbb\xbf" + json.dumps(BASE_SPEC).encode(), "application/json", 422),
    "duplicate-keys": (
        b'{"zoom": 1, "zoom": "x", "scene": {"s2": "/x"}, "model": "m", "output_prefix": "file:///x/"}',
        "application/json",
        422,
    ),
    "lone-surrogate-key": (
        b'{"scene": {"\\ud800": 1}, "model": "m", "output_prefix": "file:///x/"}',
        "application/json",
        422,
    ),
    "lone-surrogate-value": (
        b'{"scene": {"s2": "\\udc00"}, "model": "m", "output_prefix": "file:///x/"}',
        "application/json",
        422,
    ),
    "text-plain": (json.dumps(BASE_SPEC).encode(), "text/plain", 422),
    "form": (b"scene=x&model=y", "application/x-www-form-urlencoded", 422),
    "over-limit": (_dumps({**BASE_SPEC, "labels": {"a": "b" * MAX_BODY}}), "application/json", 413),
    "over-limit-chunked": (lambda: _chunks(2 * MAX_BODY), "application/json", 413),
    "at-limit-chunked": (lambda: _chunks(MAX_BODY - 8192), "application/json", 422),
    "huge-int": (
        b'{"scene": {"s2": "/x"}, "model": "m", "output_prefix": "file:///x/", "zoom": ' + b"9" * 5000 + b"}",
        "application/json",
        400,
    ),
    "many-labels": (
        _dumps({**BASE_SPEC, "labels": {str(i): "v" for i in range(MAX_LABELS + 1)}}),
        "application/json",
        422,
    ),
    "many-modalities": (
        _dumps({**BASE_SPEC, "scene": {f"m{i}": f"{EMPTY}/{i}" for i in range(MAX_MODALITIES + 1)}}),
        "application/json",
        422,
    ),
}


@pytest.mark.parametrize("name", list(RAW_BODIES))
def test_http_raw_bodies(client: TestClient, name: str) -> None:
    CASES["http.raw-body"] += 1
    body, content_type, expected = RAW_BODIES[name]
    content = body() if callable(body) else body
    r = _within_time(
        lambda: client.post("/v1/jobs", content=content, headers={**AUTH, "Content-Type": content_type}), name
    )
    check_http(r.status_code, r.text, name)
    assert r.status_code == expected, (name, r.status_code, r.text[:300])


# ------------------------------------------------------------------------------------------------
# gRPC
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    store = JobStore.from_url(SERVICE_SETTINGS.redis_url, prefix=PREFIX)
    server, port = create_server(
        JobService(store, SERVICE_SETTINGS),
        "127.0.0.1:0",
        keyring=KeyRing(Settings(auth_disabled=True)),
        watch_poll_ms=100,
    )
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
    finally:
        ch.close()
        server.stop(grace=None).wait()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.JobServiceStub:
    return pb_grpc.JobServiceStub(channel)


def _base_spec() -> pb.JobSpec:
    return pb.JobSpec(
        scene=BASE_SPEC["scene"],
        model=BASE_SPEC["model"],
        output_prefix=BASE_SPEC["output_prefix"],
        zoom=BASE_SPEC["zoom"],
    )


def _spec_with(**changes: Any) -> pb.JobSpec:
    msg = _base_spec()
    for name, value in changes.items():
        if name == "bbox":
            msg.bbox.CopyFrom(pb.BBox(min_lon=value[0], min_lat=value[1], max_lon=value[2], max_lat=value[3]))
        elif name in ("scene", "assets", "labels"):
            getattr(msg, name).clear()
            getattr(msg, name).update(value)
        else:
            setattr(msg, name, value)
    return msg


def _rpc_error(call: Callable[[], Any], where: str) -> grpc.RpcError:
    def run() -> Any:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            return list(result)  # a stream fails when read
        return result

    try:
        reply = _within_time(run, where)
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"accepted: {where}: {reply}")


def _field(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY)


#: statuses that say the caller is at fault; never INTERNAL, UNKNOWN, UNAVAILABLE or a deadline
CALLER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

NAN, INF = math.nan, math.inf
GOOD_BBOX = (-11.7, 24.6, -11.2, 24.95)


def _bbox_with(i: int, value: float) -> tuple[float, ...]:
    return tuple(value if j == i else v for j, v in enumerate(GOOD_BBOX))


# (case id, spec changes, the field named)
SPEC_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("zoom-negative", {"zoom": -1}, "zoom"),
    ("zoom-23", {"zoom": 23}, "zoom"),
    ("zoom-int32-max", {"zoom": 2**31 - 1}, "zoom"),
    ("zoom-int32-min", {"zoom": -(2**31)}, "zoom"),
    ("priority-negative", {"priority": -1}, "priority"),
    ("priority-10", {"priority": 10}, "priority"),
    ("priority-int32-max", {"priority": 2**31 - 1}, "priority"),
    ("priority-int32-min", {"priority": -(2**31)}, "priority"),
    *[
        (f"bbox-{side}-{name}", {"bbox": _bbox_with(i, v)}, "bbox")
        for i, side in enumerate(["min_lon", "min_lat", "max_lon", "max_lat"])
        for name, v in [("nan", NAN), ("inf", INF), ("-inf", -INF), ("1e308", 1e308), ("-1e308", -1e308)]
    ],
    ("bbox-lon-over-180", {"bbox": (170.0, 0.0, 180.5, 1.0)}, "bbox"),
    ("bbox-lon-under-180", {"bbox": (-180.5, 0.0, -170.0, 1.0)}, "bbox"),
    ("bbox-lat-over-90", {"bbox": (0.0, 80.0, 1.0, 90.5)}, "bbox"),
    ("bbox-lat-under-90", {"bbox": (0.0, -90.5, 1.0, -80.0)}, "bbox"),
    ("bbox-inverted-lon", {"bbox": (-11.2, 24.6, -11.7, 24.95)}, "bbox"),
    ("bbox-inverted-lat", {"bbox": (-11.7, 24.95, -11.2, 24.6)}, "bbox"),
    ("bbox-all-nan", {"bbox": (NAN, NAN, NAN, NAN)}, "bbox"),
    ("bbox-zero-size", {"bbox": (0.0, 0.0, 0.0, 0.0)}, "scene.s2"),  # a box on the wire; planning refuses it
    ("bbox-outside-the-scene", {"bbox": (10.0, 10.0, 11.0, 11.0)}, "scene.s2"),  # the scene is checked first
    ("backend", {"backend": "cuda"}, "backend"),
    ("backend-long", {"backend": "x" * 10_000}, "backend"),
    ("precision", {"precision": "fp8"}, "precision"),
    ("dtype", {"dtype": "float64"}, "dtype"),
    ("dtype-long", {"dtype": "f" * 1000}, "dtype"),
    ("date-format", {"date": "19/02/2020"}, "date"),
    ("date-impossible", {"date": "2020-02-30"}, "date"),
    ("date-compact", {"date": "20200219"}, "date"),
    ("date-with-time", {"date": "2020-02-19T00:00:00"}, "date"),
    ("date-arabic-digits", {"date": "٢٠٢٠-٠٢-١٩"}, "date"),
    ("date-long", {"date": "2020-02-19" * 1000}, "date"),
    ("model-empty", {"model": ""}, "model"),
    ("model-long", {"model": "m" * 101}, "model"),
    ("model-unknown", {"model": "no-such-model"}, "model"),  # looked up before the scene is opened
    ("output-empty", {"output_prefix": ""}, "output_prefix"),
    ("output-long", {"output_prefix": f"file://{EMPTY}/" + "a/" * MAX_PATH_BYTES}, "output_prefix"),
    (
        "output-long-component",
        {"output_prefix": f"file://{EMPTY}/" + "a" * (MAX_NAME_BYTES + 1) + "/"},
        "output_prefix",
    ),
    (
        "output-long-unicode-component",
        {"output_prefix": f"file://{EMPTY}/" + "é" * 128 + "/"},
        "output_prefix",
    ),
    ("output-outside", {"output_prefix": "file:///etc/"}, "output_prefix"),
    ("output-control-char", {"output_prefix": f"file://{EMPTY}/a\nb/"}, "output_prefix"),
    ("scene-empty", {"scene": {}}, "scene"),
    ("scene-too-many", {"scene": {f"m{i}": f"{EMPTY}/{i}" for i in range(MAX_MODALITIES + 1)}}, "scene"),
    ("scene-empty-key", {"scene": {"": f"{EMPTY}/x"}}, "scene"),
    ("scene-long-key", {"scene": {"k" * 65: f"{EMPTY}/x"}}, "scene"),
    ("scene-empty-path", {"scene": {"s2": ""}}, "scene"),
    ("scene-long-path", {"scene": {"s2": EMPTY + "/a" * (MAX_PATH_BYTES // 2)}}, "scene"),
    ("scene-long-component", {"scene": {"s2": f"{EMPTY}/" + "a" * (MAX_NAME_BYTES + 1)}}, "scene"),
    ("scene-long-unicode-component", {"scene": {"s2": f"{EMPTY}/" + "💥" * 64}}, "scene"),
    ("scene-nul", {"scene": {"s2": f"{EMPTY}/a\x00b"}}, "scene.s2"),
    ("scene-outside", {"scene": {"s2": "/etc/passwd"}}, "scene.s2"),
    ("scene-escape", {"scene": {"s2": f"{EMPTY}/../../etc/passwd"}}, "scene.s2"),
    ("scene-missing", {}, "scene.s2"),
    ("assets-too-many", {"assets": {f"B{i}": f"{EMPTY}/{i}" for i in range(MAX_ASSETS + 1)}}, "assets"),
    ("assets-long-path", {"assets": {"B02": EMPTY + "/a" * (MAX_PATH_BYTES // 2)}}, "assets"),
    ("assets-outside", {"assets": {"B02": "/etc/passwd"}}, "assets.B02"),
    ("labels-too-many", {"labels": {str(i): "v" for i in range(MAX_LABELS + 1)}}, "labels"),
    ("labels-empty-key", {"labels": {"": "v"}}, "labels"),
    ("labels-long-key", {"labels": {"k" * (MAX_LABEL_KEY_CHARS + 1): "v"}}, "labels"),
    ("labels-long-value", {"labels": {"k": "v" * (MAX_LABEL_VALUE_CHARS + 1)}}, "labels"),
    ("labels-long-unicode-key", {"labels": {"ключ" * 20: "v"}}, "labels"),
    ("labels-huge-value", {"labels": {"k": "v" * (MAX_BODY - 1000)}}, "labels"),
]


@pytest.mark.parametrize(
    ("changes", "field"), [(c, f) for _, c, f in SPEC_CASES], ids=[i for i, _, _ in SPEC_CASES]
)
def test_grpc_submit_bad_spec(stub: pb_grpc.JobServiceStub, changes: dict, field: str) -> None:
    CASES["grpc.matrix"] += 1
    msg = _spec_with(**changes)
    err = _rpc_error(
        lambda: stub.Submit(pb.SubmitRequest(spec=msg), timeout=CALL_TIMEOUT_S), f"Submit {changes}"[:300]
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert _field(err) == field, (err.details(), _field(err))
    assert err.details().startswith(field.split(".")[0]), err.details()


# (case id, method, request, the status, the field named)
REQUEST_CASES: list[tuple[str, str, Any, grpc.StatusCode, str | None]] = [
    ("submit-no-spec", "Submit", pb.SubmitRequest(), grpc.StatusCode.INVALID_ARGUMENT, "spec"),
    (
        "submit-long-idempotency-key",
        "Submit",
        pb.SubmitRequest(spec=_base_spec(), idempotency_key="k" * (MAX_TOKEN_CHARS + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "idempotency_key",
    ),
    *[
        (f"{m.lower()}-{name}", m, req(value), code, "id")
        for m, req in [
            ("Get", lambda v: pb.GetJobRequest(id=v)),
            ("Cancel", lambda v: pb.CancelJobRequest(id=v)),
            ("Watch", lambda v: pb.WatchJobRequest(id=v)),
        ]
        for name, value, code in [
            ("no-id", "", grpc.StatusCode.INVALID_ARGUMENT),
            ("long-id", "f" * (MAX_TOKEN_CHARS + 1), grpc.StatusCode.INVALID_ARGUMENT),
            ("huge-id", "f" * (MAX_BODY - 1000), grpc.StatusCode.INVALID_ARGUMENT),
            ("unknown-id", uuid.uuid4().hex, grpc.StatusCode.NOT_FOUND),
            ("unicode-id", "ид" * 16, grpc.StatusCode.NOT_FOUND),
            ("glob-id", "*", grpc.StatusCode.NOT_FOUND),
            ("nul-id", "\x00" * 32, grpc.StatusCode.NOT_FOUND),
        ]
    ],
    ("list-limit-negative", "List", pb.ListJobsRequest(limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    ("list-limit-101", "List", pb.ListJobsRequest(limit=101), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    (
        "list-limit-int32-max",
        "List",
        pb.ListJobsRequest(limit=2**31 - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    ),
    (
        "list-limit-int32-min",
        "List",
        pb.ListJobsRequest(limit=-(2**31)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    ),
    (
        "list-bad-cursor",
        "List",
        pb.ListJobsRequest(cursor="not-a-cursor"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cursor",
    ),
    (
        "list-long-cursor",
        "List",
        pb.ListJobsRequest(cursor="c" * (MAX_TOKEN_CHARS + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cursor",
    ),
    (
        "list-unicode-cursor",
        "List",
        pb.ListJobsRequest(cursor="💥" * 10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cursor",
    ),
    ("list-unknown-state", "List", pb.ListJobsRequest(state=42), grpc.StatusCode.INVALID_ARGUMENT, "state"),
    ("list-negative-state", "List", pb.ListJobsRequest(state=-1), grpc.StatusCode.INVALID_ARGUMENT, "state"),
]


@pytest.mark.parametrize(
    ("method", "request_", "code", "field"), [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES]
)
def test_grpc_bad_requests(
    stub: pb_grpc.JobServiceStub, method: str, request_: Any, code: grpc.StatusCode, field: str | None
) -> None:
    CASES["grpc.matrix"] += 1
    err = _rpc_error(
        lambda: getattr(stub, method)(request_, timeout=CALL_TIMEOUT_S), f"{method} {str(request_)[:200]}"
    )
    assert err.code() == code, (err.code(), err.details())
    assert _field(err) == field, (err.details(), _field(err))


# raw bytes that are no valid message of any request type
MALFORMED: dict[str, bytes] = {
    "truncated-length": b"\x0a\x05\x12",
    "truncated-varint": b"\x10\xff",
    "wire-type-7": b"\x0f",
    "wire-type-6": b"\x0e",
    "field-number-zero": b"\x00\x01",
    "length-past-the-end": b"\x0a\xff\xff\xff\xff\x0f",
    "end-group-without-start": b"\x0c",
    "varint-over-10-bytes": b"\x10" + b"\xff" * 11 + b"\x01",
}
#: a string field of each request holding b"\xff", which is not UTF-8
INVALID_UTF8 = {
    "Submit": b"\x0a\x03\x12\x01\xff",  # SubmitRequest.spec.model
    "Get": b"\x0a\x01\xff",  # .id
    "Cancel": b"\x0a\x01\xff",
    "Watch": b"\x0a\x01\xff",
    "List": b"\x1a\x01\xff",  # ListJobsRequest.cursor
}


@pytest.mark.parametrize("method", ["Submit", "Get", "List", "Cancel", "Watch"])
@pytest.mark.parametrize("name", [*MALFORMED, "invalid-utf8"])
def test_grpc_malformed_messages(channel: grpc.Channel, method: str, name: str) -> None:
    CASES["grpc.malformed"] += 1
    path = f"/tilefm.v1.JobService/{method}"
    call = channel.unary_stream(path) if method == "Watch" else channel.unary_unary(path)
    data = INVALID_UTF8[method] if name == "invalid-utf8" else MALFORMED[name]
    err = _rpc_error(lambda: call(data, timeout=CALL_TIMEOUT_S), f"{method} {name}")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert _field(err) == "request"


def test_grpc_message_over_the_limit(stub: pb_grpc.JobServiceStub) -> None:
    CASES["grpc.matrix"] += 1
    msg = _spec_with(labels={"k": "v" * (MAX_BODY + 1)})
    err = _rpc_error(
        lambda: stub.Submit(pb.SubmitRequest(spec=msg), timeout=CALL_TIMEOUT_S), "over the limit"
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())


int32s = st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 9, 10, 22, 23, -1])
doubles = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, 180.0, -180.0, 90.0, -90.0, 1e308])
proto_text = (
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
    | long_strings.filter(lambda s: "\ud800" not in s)
    | st.sampled_from([s for s in SPECIAL_STRINGS if not any("\ud800" <= c <= "\udfff" for c in s)])
)
proto_maps = st.dictionaries(proto_text, proto_text, max_size=MAX_LABELS + 4)


@st.composite
def proto_specs(draw: st.DrawFn) -> pb.JobSpec:
    msg = _base_spec()
    for name in draw(
        st.sets(
            st.sampled_from(
                [
                    "zoom",
                    "priority",
                    "bbox",
                    "model",
                    "output_prefix",
                    "backend",
                    "precision",
                    "dtype",
                    "date",
                    "scene",
                    "assets",
                    "labels",
                ]
            ),
            min_size=1,
        )
    ):
        if name in ("zoom", "priority"):
            setattr(msg, name, draw(int32s))
        elif name == "bbox":
            msg.bbox.CopyFrom(
                pb.BBox(**{k: draw(doubles) for k in ("min_lon", "min_lat", "max_lon", "max_lat")})
            )
        elif name in ("scene", "assets", "labels"):
            getattr(msg, name).clear()
            getattr(msg, name).update(draw(proto_maps))
        else:
            setattr(msg, name, draw(proto_text))
    return msg


@given(spec=proto_specs(), key=st.none() | proto_text)
@settings(max_examples=_examples(250), **SETTINGS)
def test_grpc_generated_specs(stub: pb_grpc.JobServiceStub, spec: pb.JobSpec, key: str | None) -> None:
    CASES["grpc.specs"] += 1
    request = pb.SubmitRequest(spec=spec, idempotency_key=key or "")
    err = _rpc_error(lambda: stub.Submit(request, timeout=CALL_TIMEOUT_S), f"Submit {str(spec)[:300]}")
    assert err.code() in CALLER_CODES, (err.code(), err.details(), str(spec)[:300])
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        assert _field(err), (err.details(), str(spec)[:300])
