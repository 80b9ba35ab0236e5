"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `s3server`, also used by bench/

from s3server import S3Server  # noqa: E402
from tilefm.settings import Settings, get_settings  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder beside the repository (test data, reference outputs, tools)."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        raise FileNotFoundError(f"the shared folder {path} is missing; the tests need it")
    return path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session, with the bucket `tilefm`."""
    with S3Server(bucket="tilefm") as server:
        yield server


@pytest.fixture(scope="session")
def s3_settings(s3_server: S3Server) -> Iterator[Settings]:
    """tilefm Settings pointed at `s3_server`; the TILEFM_S3_* env vars are set too (for
    subprocesses and `get_settings()`) and restored after the session."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.tilefm_env().items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        yield Settings()
        get_settings.cache_clear()
