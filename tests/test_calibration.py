"""Calibration sets for int8 TensorRT engines (tilefm.backends.calibration): made from real tiles
of the sample scene by `tilefm models calibrate`, found again for the band set an engine is built
for, and turned into the Q/DQ graph TensorRT builds from, which ONNX Runtime runs here (no GPU)
within the int8 limits of the torch fp32 reference on other real tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from tilefm.backends import BackendOptions
from tilefm.backends.calibration import (
    Calibration,
    calibration_path,
    quantize_qdq,
    require_calibration,
)
from tilefm.backends.compare import agreement, rel_error
from tilefm.backends.engine_cache import calibration_digest, engine_key
from tilefm.engine.runtime import WorkerSpec, place_encoders
from tilefm.errors import BackendError
from tilefm.grid import plan_tiles
from tilefm.models import get_card
from tilefm.models.calibrate import make_calibration
from tilefm.settings import Settings

VIT = get_card("vit-small")
S2 = tuple(range(10))  # the card's S2 bands come first


@pytest.fixture(scope="module")
def scene(scene_dir: Path):
    from tilefm.io.scene import open_scene

    return open_scene({"s2": str(scene_dir)})


@pytest.fixture(scope="module")
def calibration(scene) -> Calibration:
    return make_calibration(VIT, scene, plan_tiles(scene.footprint, 12), tiles=16)


@pytest.mark.integration
def test_the_cli_puts_a_set_of_real_tiles_in_the_model_store(scene_dir: Path, tmp_path: Path) -> None:
    r = run_cli(
        "models",
        "calibrate",
        "vit-small",
        "--scene",
        f"s2={scene_dir}",
        "--zoom",
        "12",
        "--tiles",
        "12",
        env={"TILEFM_MODEL_STORE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    path = calibration_path(VIT, tmp_path, ["s2"])
    assert path == tmp_path / "vit-small" / "calibration-s2.npz" and str(path) in r.stdout
    cal = Calibration.load(path)
    assert cal.x.dtype == np.float16 and cal.x.shape == (12, 10, 256, 256)
    assert cal.present == S2 and cal.weights == "seed:0" and '"zoom": 12' in cal.source
    # normalised real reflectances: finite, every band varying, and twelve different tiles
    x = cal.x.astype(np.float32)
    assert np.isfinite(x).all() and np.abs(x).max() < 10 and (x.std(axis=(0, 2, 3)) > 1e-3).all()
    flat = cal.x.reshape(12, -1).astype(np.float32)
    assert len({row.tobytes() for row in flat}) == 12
    # bad input: a clear error, no traceback
    r = run_cli(
        "models",
        "calibrate",
        "presto",
        "--scene",
        f"s2={scene_dir}",
        env={"TILEFM_MODEL_STORE": str(tmp_path)},
    )
    assert r.returncode == 2 and "does not run in int8" in r.stderr and "Traceback" not in r.stderr


def test_the_set_is_found_for_the_bands_an_engine_is_built_for(
    calibration: Calibration, tmp_path: Path
) -> None:
    with pytest.raises(BackendError, match="tilefm models calibrate vit-small") as e:
        require_calibration(VIT, tmp_path, S2)
    assert e.value.field == "precision"
    calibration.save(calibration_path(VIT, tmp_path, ["s2"]))
    np.testing.assert_array_equal(require_calibration(VIT, tmp_path, S2), calibration.x.astype(np.float32))
    sub = require_calibration(VIT, tmp_path, (1, 2, 3))  # a tile missing some bands: those channels
    np.testing.assert_array_equal(sub, calibration.x[:, 1:4].astype(np.float32))
    with pytest.raises(BackendError, match="with bands .*s1:"):  # S1 bands: not in an S2 set
        require_calibration(VIT, tmp_path, (0, 10))
    # made for other weights: not used
    other = Calibration(calibration.x, calibration.present, calibration.bands, "ab" * 32, calibration.source)
    other.save(calibration_path(VIT, tmp_path, ["s2"]))
    with pytest.raises(BackendError, match="needs a calibration set"):
        require_calibration(VIT, tmp_path, S2)


def test_qdq_int8_graph_matches_fp32_on_other_tiles(calibration: Calibration, scene) -> None:
    """The graph TensorRT builds its int8 engine from, run by ONNX Runtime on the CPU: static
    symmetric scales from the calibration tiles, checked on tiles of another zoom."""
    import onnx

    from tilefm.backends.onnx_export import export_onnx
    from tilefm.backends.onnxruntime import OrtRunner
    from tilefm.io.read import read_tile
    from tilefm.models.vit_tiles import ViTTileModel

    model = ViTTileModel(VIT, "torch", None)
    tiles = plan_tiles(scene.footprint, 11, bbox=(-11.5, 24.7, -11.2, 24.9)).tiles[:4]
    x = np.stack([model.inputs(read_tile(scene, VIT, t, 0))[1] for t in tiles])
    bound = model.net.bind([model.wavelengths[i] for i in S2])
    ref = model.embed(S2, x)
    fp32 = export_onnx(bound, x.shape[1:])
    qdq = quantize_qdq(fp32, calibration.for_bands(S2))
    graph = onnx.load_from_string(qdq).graph
    ops = [n.op_type for n in graph.node]
    # Q/DQ pairs on the trunk's matrix products (TensorRT's explicit quantization), not ORT's integer ops
    assert (
        ops.count("QuantizeLinear") >= 4 * VIT.vit.depth
        and "DequantizeLinear" in ops
        and "MatMulInteger" not in ops
    )
    zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    got = OrtRunner(qdq)(x)
    a = agreement(got, ref)
    assert a.ok("int8"), str(a)
    assert rel_error(got, ref) > 1e-4  # the quantized graph ran
    # scales from other inputs give another graph: the calibration is what the engine depends on
    assert quantize_qdq(fp32, calibration.for_bands(S2)[:4]) != qdq


def test_engine_keys_and_placement_of_tensorrt_int8(calibration: Calibration) -> None:
    samples = calibration.for_bands(S2)
    base = ("cd" * 32, (9, 0), "10.3.0", "int8", (10, 256, 256), 8)
    a = engine_key(*base, calibration_sha256=calibration_digest(samples))
    b = engine_key(*base, calibration_sha256=calibration_digest(samples[:8]))
    assert a.digest() != b.digest() and a.filename != b.filename and "-int8-" in a.filename
    assert calibration_digest(None) == "" and len(calibration_digest(samples)) == 64
    # keys without a calibration (fp16, fp32 engines) are those of before: caches stay valid
    assert (
        engine_key("cd" * 32, (9, 0), "10.3.0", "fp16", (10, 256, 256), 8).digest()
        == engine_key("cd" * 32, (9, 0), "10.3.0", "fp16", (10, 256, 256), 8, calibration_sha256="").digest()
    )
    # int8 actors: CPU ones for onnxruntime, GPU ones when TensorRT was asked for
    int8 = WorkerSpec(card=VIT, backend="onnxruntime", weights=None, precision="int8")
    cluster = {"CPU": 16.0, "GPU": 2.0}
    assert place_encoders(int8, "auto", Settings(), cluster).num_gpus == 0.0
    assert place_encoders(int8, "tensorrt", Settings(), cluster).num_gpus == 1.0


def test_tensorrt_int8_without_a_calibration_set_says_so() -> None:
    from tilefm.backends.tensorrt import tensorrt_runner

    with pytest.raises(BackendError, match="calibration set") as e:
        tensorrt_runner(
            None,
            (10, 256, 256),
            BackendOptions(precision="int8", max_batch=2, engine_cache="/tmp"),
            model_sha256="cd" * 32,
        )  # type: ignore[arg-type]  # no module: it is refused before one is needed
    assert e.value.field == "precision"


def test_the_library_call_makes_the_same_kind_of_set(scene_dir: Path, tmp_path: Path) -> None:
    """`tilefm.models.calibrate.calibrate`, what the CLI wraps: a set of real tiles in the store;
    a count under one is an error naming `tiles`."""
    from tilefm.models.calibrate import calibrate

    path = calibrate("vit-small", {"s2": str(scene_dir)}, zoom=12, tiles=4, store=tmp_path)
    assert path == calibration_path(VIT, tmp_path, ["s2"])
    cal = Calibration.load(path)
    assert cal.x.shape == (4, 10, 256, 256) and cal.present == S2 and '"zoom": 12' in cal.source
    with pytest.raises(BackendError, match="at least 1 tile") as e:
        calibrate("vit-small", {"s2": str(scene_dir)}, zoom=12, tiles=0, store=tmp_path)
    assert e.value.field == "tiles"
