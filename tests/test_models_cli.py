"""`tilefm models ...`: listing, reference checks against the official outputs, and pulling weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

#: every test runs the `tilefm` command
pytestmark = pytest.mark.integration

REFERENCES = ["s2_only", "s2_srtm", "s2_3steps"]


def test_list_shows_both_models_and_their_weights() -> None:
    r = run_cli("models", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["presto"]["output"] == "embedding[128]" and rows["presto"]["weights"] == "yes"
    assert rows["ukis-csmask"]["output"] == "classes[1]" and rows["ukis-csmask"]["weights"] == "yes"
    assert "presto" in run_cli("models", "list").stdout


@pytest.mark.parametrize("name", REFERENCES)
def test_verify_presto_matches_the_official_outputs(name: str, shared_dir: Path) -> None:
    r = run_cli(
        "models", "verify", "presto", "--reference", str(shared_dir / "reference/presto" / f"{name}.npz")
    )
    assert r.returncode == 0, r.stderr
    assert ": ok" in r.stdout
    diff = float(r.stdout.split("max abs diff ")[1].split()[0])
    assert diff < 1e-4


def test_verify_fails_past_the_tolerance(shared_dir: Path) -> None:
    r = run_cli(
        "models",
        "verify",
        "presto",
        "--reference",
        str(shared_dir / "reference/presto/s2_only.npz"),
        "--tolerance",
        "1e-12",
    )
    assert r.returncode == 1
    assert "FAILED" in r.stdout


def test_verify_bad_reference(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    r = run_cli("models", "verify", "presto", "--reference", str(bad))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_pull_verifies_the_checksum(tmp_path: Path, model_store: Path, scene_dir: Path) -> None:
    store = tmp_path / "store"
    env = {"TILEFM_MODEL_STORE": str(store)}
    src = model_store / "presto" / "default_model.pt"
    r = run_cli("models", "pull", "presto", "--url", src.as_uri(), env=env)
    assert r.returncode == 0, r.stderr
    assert (store / "presto" / "default_model.pt").read_bytes() == src.read_bytes()
    # a file that is not the card's model is refused, and nothing is installed
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"x" * 100)
    r = run_cli("models", "pull", "ukis-csmask", "--url", wrong.as_uri(), env=env)
    assert r.returncode == 2 and "sha256" in r.stderr
    assert not (store / "ukis-csmask" / "model.onnx").exists()
    # a run with weights missing from the store says how to get them
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "ukis-csmask",
        "--out",
        str(tmp_path / "x.tif"),
        env=env,
    )
    assert r.returncode == 2 and "tilefm models pull ukis-csmask" in r.stderr


def test_corrupt_weights_are_refused(tmp_path: Path, scene_dir: Path) -> None:
    store = tmp_path / "store"
    (store / "ukis-csmask").mkdir(parents=True)
    (store / "ukis-csmask" / "model.onnx").write_bytes(b"\0" * 1000)
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        "ukis-csmask",
        "--zoom",
        "11",
        "--out",
        str(tmp_path / "x.tif"),
        env={"TILEFM_MODEL_STORE": str(store)},
    )
    assert r.returncode == 2 and "sha256" in r.stderr and not (tmp_path / "x.tif").exists()
