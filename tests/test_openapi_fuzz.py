"""Property-based fuzzing of the job API from its own OpenAPI document (schemathesis): whatever
is sent, no 5xx, and every response matches the documented schema and status codes."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tilefm.api.auth import hash_key
from tilefm.api.jobs import create_app
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings

KEY = "fuzz-" + uuid.uuid4().hex
PREFIX = f"tilefm-fuzz-{uuid.uuid4().hex[:8]}:"


def _app():
    env = {
        "TILEFM_REDIS_PREFIX": PREFIX,
        "TILEFM_API_KEYS": json.dumps(
            [{"name": "fuzz", "sha256": hash_key(KEY), "scopes": ["jobs:read", "jobs:write"]}]
        ),
        # fuzzed scene paths and outputs stay inside an empty folder: nothing real is read or written
        "TILEFM_ALLOWED_SOURCES": json.dumps(["/tmp/tilefm-fuzz-empty"]),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps(["file:///tmp/tilefm-fuzz-empty/"]),
    }
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return create_app(Settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)


app = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    os.makedirs("/tmp/tilefm-fuzz-empty", exist_ok=True)
    yield
    store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=PREFIX)
    keys = list(store.redis.scan_iter(f"{PREFIX}*"))
    if keys:
        store.redis.delete(*keys)


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("TILEFM_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case) -> None:
    # every check but "a schema-valid request must be accepted": a job spec that is valid JSON
    # can still name a scene that does not exist, which is a documented 422, not a bug
    case.call_and_validate(
        headers={"Authorization": f"Bearer {KEY}"},
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )


# ------------------------------------------------------------------------------------------------
# the tile server: fuzzed job ids, tile coordinates and rendering parameters never give a 5xx
# ------------------------------------------------------------------------------------------------


def _tiler_app():
    from tilefm.api.tiler import create_app as create_tiler

    saved = dict(os.environ)
    os.environ.update(
        {"TILEFM_REDIS_PREFIX": PREFIX, "TILEFM_ALLOWED_OUTPUTS": json.dumps(["/tmp/tilefm-fuzz-empty"])}
    )
    try:
        return create_tiler(Settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)


# the job routes (ours); /cog is TiTiler's, refused before it reads anything (test_tiler.py)
tiler_schema = schemathesis.openapi.from_asgi("/openapi.json", _tiler_app()).include(path_regex="^/v1/")


@tiler_schema.parametrize()
@settings(
    max_examples=int(os.environ.get("TILEFM_FUZZ_EXAMPLES", "40")) // 2,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_tiler_never_fails_on_bad_input(case) -> None:
    response = case.call()
    assert response.status_code < 500, (
        case.method,
        case.formatted_path,
        case.query,
        response.status_code,
        response.text[:300],
    )
