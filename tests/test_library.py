"""The library as a dependency: importable without Ray, a CLI that explains itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import run_cli

#: both tests start tilefm in a process of its own
pytestmark = pytest.mark.integration


def test_importing_the_library_does_not_start_or_import_ray() -> None:
    code = (
        "import sys, tilefm.engine.pipeline, tilefm.cli, tilefm.engine.stitch, tilefm.models.onnx, "
        "tilefm.engine.runtime; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_help_shows_an_example() -> None:
    r = run_cli("run", "--help")
    assert r.returncode == 0
    assert "tilefm run --scene s2=" in r.stdout and "--dry-run" in r.stdout
    assert run_cli("--version").stdout.startswith("tilefm ")
