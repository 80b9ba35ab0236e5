"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tilefm.localstack import S3Server
from tilefm.settings import Settings, get_settings


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


REPO = Path(__file__).resolve().parents[1]
#: artefacts tests keep (screenshots, sample outputs): under the repo, ignored by git
OUTPUT_DIR = REPO / "test-output"


@pytest.fixture(scope="session", autouse=True)
def model_store(shared_dir: Path) -> Iterator[Path]:
    """Every test (and every `tilefm` subprocess) reads weights from ../shared/models."""
    store = shared_dir / "models"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEFM_MODEL_STORE", str(store))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        get_settings.cache_clear()
        yield store
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def scene_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "s2-l2a-29RKH-20200219"


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `tilefm` command as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tilefm", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
