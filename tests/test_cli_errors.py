"""Bad input through the CLI: one clear error line, exit code 2, nothing written to the output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli

#: every test runs the `tilefm` command
pytestmark = pytest.mark.integration

S2 = ["B02", "B03", "B04", "B08", "B11", "B12"]


@pytest.fixture(scope="module")
def broken(tmp_path_factory, scene_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    no_b11 = root / "no-b11"
    no_b11.mkdir()
    for b in S2:
        if b != "B11":
            os.symlink(scene_dir / f"{b}.tif", no_b11 / f"{b}.tif")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    for b in S2:
        os.symlink(scene_dir / f"{b}.tif", corrupt / f"{b}.tif")
    (corrupt / "B04.tif").unlink()
    (corrupt / "B04.tif").write_bytes(b"II*\x00" + np.random.default_rng(1).bytes(4000))
    plain = root / "plain.tif"  # pixels with no CRS and no geotransform
    with rasterio.open(scene_dir / "B04.tif") as src:
        data = src.read()
    with rasterio.open(
        plain, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=1, dtype=data.dtype
    ) as dst:
        dst.write(data)
    return {"no_b11": no_b11, "corrupt": corrupt, "plain": plain}


CASES = {
    "missing band": (["--scene", "s2={no_b11}", "--model", "ukis-csmask"], ["B11", "scene.s2"]),
    "unreadable file": (["--scene", "s2={corrupt}", "--model", "ukis-csmask"], ["B04.tif", "cannot read"]),
    "not georeferenced": (
        ["--scene", "s2={plain}", "--model", "ukis-csmask"],
        ["not georeferenced", "plain.tif"],
    ),
    "no such source": (["--scene", "s2=/nonexistent/scene", "--model", "ukis-csmask"], ["does not exist"]),
    "bad scene syntax": (["--scene", "s2", "--model", "ukis-csmask"], ["MODALITY=SOURCE"]),
    "zoom too high": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--zoom", "30"],
        ["zoom", "30", "0..22"],
    ),
    "zoom negative": (["--scene", "s2={scene}", "--model", "ukis-csmask", "--zoom", "-1"], ["zoom", "-1"]),
    "too many tiles": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--zoom", "16"],
        ["tiles", "limit"],
    ),
    "unknown model": (["--scene", "s2={scene}", "--model", "nope"], ["nope", "presto", "ukis-csmask"]),
    "bbox outside": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--bbox", "10,10,11,11"],
        ["bbox", "does not intersect"],
    ),
    "bbox malformed": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--bbox", "1,2,3"],
        ["bbox", "four numbers"],
    ),
    "bad backend": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--backend", "torch"],
        ["backend", "onnxruntime"],
    ),
    "bad out scheme": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--out", "gs://bucket/x.tif"],
        ["gs://bucket/x.tif"],
    ),
    "out not a tif": (
        ["--scene", "s2={scene}", "--model", "ukis-csmask", "--out", "{tmp}/x.png"],
        ["GeoTIFF"],
    ),
    "bad date": (
        ["--scene", "s2={scene}", "--model", "presto", "--date", "2020-13-01"],
        ["date", "YYYY-MM-DD"],
    ),
    "bad dtype": (["--scene", "s2={scene}", "--model", "presto", "--dtype", "int4"], ["dtype", "int4"]),
    "unknown precision": (
        ["--scene", "s2={scene}", "--model", "vit-small", "--precision", "fp8"],
        ["precision:", "'fp8'", "int8"],
    ),
    "precision the card lacks": (
        ["--scene", "s2={scene}", "--model", "presto", "--precision", "int8"],
        ["precision:", "fp32, bf16, fp16"],
    ),
    "gpu precision without a gpu": (
        ["--scene", "s2={scene}", "--model", "vit-small", "--precision", "bf16"],
        ["precision:", "bf16", "tensorrt or torch-cuda"],
    ),
    "int8 on torch": (
        ["--scene", "s2={scene}", "--model", "vit-small", "--backend", "torch", "--precision", "int8"],
        ["precision:", "onnxruntime"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, broken: dict[str, Path], scene_dir: Path, tmp_path: Path) -> None:
    args, needles = CASES[case]
    out = tmp_path / "out" / "result.tif"
    subs = {
        "no_b11": broken["no_b11"],
        "corrupt": broken["corrupt"],
        "plain": broken["plain"],
        "scene": scene_dir,
        "tmp": tmp_path,
    }
    args = [a.format(**subs) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    if "--zoom" not in args:
        args += ["--zoom", "11"]
    r = run_cli("run", *args, "--executor", "local", timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tilefm: error: ")
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert "Traceback" not in r.stderr
    assert not out.exists() and not out.with_name("result.stac.json").exists()


def test_missing_s3_bucket_fails_before_any_work(s3_settings, scene_dir: Path) -> None:
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "ukis-csmask",
        "--zoom",
        "11",
        "--out",
        "s3://no-such-bucket/x.tif",
        "--executor",
        "local",
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "no-such-bucket" in r.stderr and r.stderr.count("\n") == 1


def test_failed_run_leaves_the_destination_untouched(scene_dir: Path, tmp_path: Path) -> None:
    """An existing output stays as it was when a later run is refused."""
    out = tmp_path / "keep.tif"
    out.write_bytes(b"previous result")
    r = run_cli(
        "run", "--scene", f"s2={scene_dir}", "--model", "ukis-csmask", "--zoom", "99", "--out", str(out)
    )
    assert r.returncode == 2
    assert out.read_bytes() == b"previous result"


def test_dry_run_prints_the_plan_and_writes_nothing(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dry.tif"
    r = run_cli("run", "--scene", f"s2={scene_dir}", "--model", "ukis-csmask", "--out", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    import json

    plan = json.loads(r.stdout)
    assert plan["zoom"] == 11  # 100 m pixels at 24.8 N: the coarsest zoom no coarser than that
    assert plan["tiles"] == 56 and plan["backend"] == "onnxruntime"
    assert not out.exists()
