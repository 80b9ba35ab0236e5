"""tilefm.libc: the C calls are found on Linux/glibc and answer False/None where missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tilefm import libc

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux calls")


@linux
def test_calls_found_on_linux(tmp_path):
    assert libc.mallopt(libc.M_TRIM_THRESHOLD, 1 << 30)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    with path.open("r+b") as f:
        assert libc.sync_file_range(f.fileno(), 0, 8192)
        assert not libc.sync_file_range(-1, 0, 8192)  # a bad descriptor is an answer, not a raise
    assert libc.has_fallocate()
    assert libc.parent_death_signal() is not None


@linux
def test_omp_thread_count_reaches_torch():
    code = (
        "import torch; torch.ones(1 << 16).sum(); from tilefm import libc; "
        "ok = libc.omp_set_num_threads(1); print(ok, torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ok, threads = out.stdout.split()
    assert ok == "True" and threads == "1"


def test_missing_platform_answers_false(monkeypatch):
    monkeypatch.setattr(libc, "LINUX", False)
    monkeypatch.setattr(libc, "_found", {})
    assert libc.mallopt(libc.M_MMAP_THRESHOLD, 1 << 20) is False
    assert libc.sync_file_range(0, 0, 1) is False
    assert libc.has_fallocate() is False
    assert libc.fallocate(0, 0, 0, 1) is False
    assert libc.omp_set_num_threads(1) is False
    assert libc.parent_death_signal() is None
