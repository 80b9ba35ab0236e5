"""Backends: selection (`auto` takes the fastest available), clear errors for missing ones,
TensorRT engine cache keys, and every backend against the torch fp32 reference on real tiles
(onnxruntime fp32 and int8 here; the GPU ones with CUDA only): max relative error =
max|out - ref| / max|ref| (fp32 < 1e-4, fp16/bf16 < 2e-2, int8 < 5e-2) and the share of pixels
keeping their class in a k-means class map of the embeddings (`tilefm.backends.compare`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import tilefm.backends as backends
from tilefm.backends import BackendOptions, resolve_precision, select_backend
from tilefm.backends.compare import LIMITS, agreement, class_agreement, kmeans, rel_error
from tilefm.backends.engine_cache import engine_key, engine_uri, load_or_build
from tilefm.errors import BackendError
from tilefm.jobs.models import JobSpec
from tilefm.models import get_card

SHA = "ab" * 32
CUDA = torch.cuda.is_available()


def gpu(test):
    """GPU-only: marked `gpu` and skipped (before any fixture runs) without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(test))


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Pretend which backends this machine has: machine(cuda=..., trt=..., ort_cuda=...)."""

    def set_(*, cuda: bool = False, trt: bool = False, ort_cuda: bool = False) -> None:
        installed = {"torch": True, "torch-cuda": True, "onnxruntime": True, "tensorrt": trt}
        monkeypatch.setattr(backends, "is_installed", lambda name: installed[name])
        monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
        monkeypatch.setattr(backends, "ort_cuda_available", lambda: ort_cuda)

    return set_


def test_auto_picks_the_fastest_available(machine) -> None:
    vit, presto, clouds = get_card("vit-small"), get_card("presto"), get_card("ukis-csmask")
    machine()
    assert select_backend(vit) == "onnxruntime"  # CPU: the card's order
    assert select_backend(presto) == "torch" and select_backend(clouds) == "onnxruntime"
    machine(ort_cuda=True)
    assert select_backend(vit) == "onnxruntime"
    machine(cuda=True)
    assert select_backend(vit) == "torch-cuda"
    machine(cuda=True, trt=True)
    assert select_backend(vit) == "tensorrt"
    assert select_backend(clouds) == "onnxruntime"  # only what the card lists
    machine(trt=True)  # TensorRT installed but no GPU: falls back
    assert select_backend(vit) == "onnxruntime"


def test_explicit_backend_that_is_missing_says_how_to_get_it(machine) -> None:
    vit = get_card("vit-small")
    machine()
    with pytest.raises(BackendError, match=r"not installed: pip install 'tilefm\[tensorrt\]'"):
        select_backend(vit, "tensorrt")
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        select_backend(vit, "torch-cuda")
    with pytest.raises(BackendError, match="cannot run on 'tensorrt'"):
        select_backend(get_card("ukis-csmask"), "tensorrt")
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        select_backend(vit, "cuda")
    assert select_backend(vit, "torch") == "torch"


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_is_a_clear_error() -> None:
    from tilefm.backends.tensorrt import require_tensorrt

    with pytest.raises(BackendError, match=r"tilefm\[tensorrt\]"):
        require_tensorrt()
    scene = Path(__file__).resolve().parents[2] / "shared" / "data" / "s2-l2a-29RKH-20200219"
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene}",
        "--model",
        "vit-small",
        "--backend",
        "tensorrt",
        "--out",
        "/tmp/x.tif",
        "--dry-run",
    )
    assert r.returncode == 2 and "tilefm[tensorrt]" in r.stderr, r.stderr


def test_precision(machine) -> None:
    vit, presto, clouds = get_card("vit-small"), get_card("presto"), get_card("ukis-csmask")
    machine(cuda=True)
    assert resolve_precision(vit, "torch") == "fp32"
    assert (
        resolve_precision(vit, "torch-cuda") == "bf16"
        and resolve_precision(vit, "tensorrt", "fp16") == "fp16"
    )
    assert (
        resolve_precision(presto, "torch-cuda") == "bf16"
        and resolve_precision(presto, "torch-cuda", "fp32") == "fp32"
    )
    assert resolve_precision(clouds, "onnxruntime") == "fp32"  # the card allows nothing else
    with pytest.raises(BackendError, match="needs a GPU backend"):
        resolve_precision(vit, "torch", "fp16")
    with pytest.raises(BackendError, match="may run in"):
        resolve_precision(clouds, "onnxruntime", "bf16")
    # int8: ONNX Runtime's CPU kernels, or a TensorRT engine from a calibration set
    # (tests/test_calibration.py)
    assert resolve_precision(vit, "onnxruntime", "int8") == "int8"
    assert resolve_precision(vit, "tensorrt", "int8") == "int8"
    for backend, says in (("torch-cuda", "runs on onnxruntime"), ("torch", "runs on onnxruntime")):
        with pytest.raises(BackendError, match=says) as e:
            resolve_precision(vit, backend, "int8")
        assert e.value.field == "precision"
    with pytest.raises(BackendError, match="fp32 graph or its int8"):
        resolve_precision(vit, "onnxruntime", "fp16")
    with pytest.raises(BackendError, match="may run in fp32, bf16, fp16, not 'int8'"):
        resolve_precision(presto, "torch", "int8")


def test_auto_backend_follows_the_precision(machine) -> None:
    vit, presto = get_card("vit-small"), get_card("presto")
    machine(cuda=True, trt=True)
    assert (
        select_backend(vit, precision="int8") == "onnxruntime"
    )  # not the GPU ones (TensorRT's needs a calibration set)
    assert select_backend(vit, "tensorrt", precision="int8") == "tensorrt"  # unless asked for
    assert select_backend(vit, precision="fp16") == "tensorrt"
    machine()
    with pytest.raises(BackendError, match="in bf16 .*it needs tensorrt or torch-cuda") as e:
        select_backend(vit, precision="bf16")
    assert e.value.field == "precision"
    assert select_backend(vit, precision="bf16", remote=True) == "auto"  # the cluster's GPU workers decide
    with pytest.raises(BackendError, match="none of its backends"):
        select_backend(presto, precision="int8")


def test_job_spec_accepts_torch_cuda() -> None:
    spec = JobSpec(scene={"s2": "/x"}, model="vit-small", output_prefix="file:///o/", backend="torch-cuda")
    assert spec.backend == "torch-cuda"


def test_engine_cache_key_is_stable_and_covers_everything() -> None:
    base = dict(
        model_sha256=SHA,
        compute_capability=(9, 0),
        tensorrt_version="10.3.0",
        precision="fp16",
        input_shape=(10, 256, 256),
        max_batch=8,
    )
    key = engine_key(**base)
    assert key == engine_key(**base) and key.digest() == engine_key(**base).digest()
    assert key.batch_sizes == (1, 8, 8)
    assert key.filename.startswith(
        "abababababab-sm90-trt10.3.0-fp16-10x256x256-b8-"
    ) and key.filename.endswith(".engine")
    changes = dict(
        model_sha256="cd" * 32,
        compute_capability=(8, 9),
        tensorrt_version="10.4.0",
        precision="bf16",
        input_shape=(13, 256, 256),
        max_batch=16,
    )
    digests = {key.digest()}
    for field, value in changes.items():
        digests.add(engine_key(**{**base, field: value}).digest())
    digests.add(engine_key(**base, opt_batch=4).digest())
    assert len(digests) == len(changes) + 2
    with pytest.raises(ValueError, match="64 lowercase hex"):
        engine_key(**{**base, "model_sha256": "abc"})
    assert engine_uri("s3://bucket/engines/", key) == f"s3://bucket/engines/{key.filename}"


def test_engine_cache_builds_once_then_loads(tmp_path: Path) -> None:
    key = engine_key(SHA, (9, 0), "10.3.0", "fp16", (10, 256, 256), 8)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"engine bytes"

    prefix = str(tmp_path / "engines")
    assert load_or_build(prefix, key, build) == (b"engine bytes", True)
    assert load_or_build(prefix, key, build) == (b"engine bytes", False)  # another worker loads it
    assert len(builds) == 1 and (tmp_path / "engines" / key.filename).read_bytes() == b"engine bytes"
    assert [p.name for p in (tmp_path / "engines").iterdir()] == [key.filename]  # no temporary left


# --- against the torch fp32 reference on real tiles (GPU backends with CUDA only) ------------


@pytest.fixture(scope="module")
def reference(scene_dir: Path):
    """vit-small bound to the S2 bands, real tiles, and the torch fp32 CPU output."""
    from tilefm.grid import plan_tiles
    from tilefm.io.read import read_tile
    from tilefm.io.scene import open_scene
    from tilefm.models.vit_tiles import ViTTileModel

    scene = open_scene({"s2": str(scene_dir)})
    card = get_card("vit-small")
    plan = plan_tiles(scene.footprint, 10, bbox=(-11.5, 24.7, -11.3, 24.85))
    model = ViTTileModel(card, "torch", None)
    parts = [model.inputs(read_tile(scene, card, t, 0)) for t in plan.tiles[:3]]
    bands = parts[0][0]
    x = np.stack([p[1] for p in parts])
    bound = model.net.bind(list(bands.wavelengths_um))
    return bound, x, model.embed(bands, x)


rel_err = rel_error


def check(got: np.ndarray, ref: np.ndarray, precision: str) -> None:
    """Within the precision's error limit, and the k-means class map of the embeddings kept."""
    a = agreement(got, ref)
    assert a.ok(precision), (precision, str(a))


def test_class_agreement_tells_class_maps_apart() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32)).astype(np.float32) * 5
    ref = (centres[rng.integers(0, 4, 4000)] + rng.normal(size=(4000, 32))).astype(np.float32)
    assert class_agreement(ref, ref, k=4) == 1.0
    assert class_agreement(ref + 1e-3 * rng.normal(size=ref.shape).astype(np.float32), ref, k=4) > 0.999
    shuffled = ref[rng.permutation(len(ref))]  # same values, other pixels: chance-level agreement
    assert class_agreement(shuffled, ref, k=4) < 0.5
    # [N, C, H, W] maps: pixels, not tiles, are what is labelled
    assert (
        class_agreement(
            ref.reshape(10, 20, 20, 32).transpose(0, 3, 1, 2),
            ref.reshape(10, 20, 20, 32).transpose(0, 3, 1, 2),
            k=4,
        )
        == 1.0
    )
    assert kmeans(ref, 4).shape == (4, 32)
    with pytest.raises(ValueError, match="at least 8 distinct"):
        kmeans(np.ones((100, 3), np.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(ref[:10], ref[:11])


def test_onnxruntime_fp32_and_int8_match_reference(reference) -> None:
    """The exported graph, and its int8 quantization, against torch fp32 on real tiles. The int8
    graph must really be quantized (its matrix products integer ones), not the fp32 one again."""
    import onnx

    from tilefm.backends.onnx_export import export_onnx, quantize_int8
    from tilefm.backends.onnxruntime import OrtRunner

    bound, x, ref = reference
    fp32 = export_onnx(bound, x.shape[1:])
    check(OrtRunner(fp32)(x), ref, "fp32")
    int8 = quantize_int8(fp32)
    ops = [n.op_type for n in onnx.load_from_string(int8).graph.node]
    # per block: q/k/v, the attention's projection and the MLP's two (q@k and attn@v stay float)
    assert (
        ops.count("MatMulInteger") >= 4 * get_card("vit-small").vit.depth and "DynamicQuantizeLinear" in ops
    )
    assert len(int8) < 0.4 * len(fp32)  # int8 weights
    run = OrtRunner(fp32, precision="int8")
    assert run.precision == "int8" and run.session.providers == ["CPUExecutionProvider"]
    got = run(x)
    assert got.shape == ref.shape
    check(got, ref, "int8")
    assert rel_err(got, ref) > 1e-4  # it is the quantized graph that ran


@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("graphs", [True, False])
def test_torch_cuda_matches_reference(reference, precision: str, graphs: bool) -> None:
    from tilefm.backends.torch_cuda import TorchCudaRunner

    bound, x, ref = reference
    run = TorchCudaRunner(bound, x.shape[1:], precision=precision, max_batch=2, cuda_graphs=graphs)
    got = run(x)  # 3 tiles with batch 2: one full batch and one padded one
    assert got.shape == ref.shape
    check(got, ref, precision)


@gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_torch_cuda_batches_queued_behind_each_other(reference, graphs: bool) -> None:
    """`launch` queues a batch and returns: three batches queued before any result is taken
    (the third reuses the first one's pinned slot), tiles given as a list or as one array, each
    result what a call on that batch alone gives, and the inputs free to change once queued."""
    from tilefm.backends.torch_cuda import TorchCudaRunner

    bound, x, ref = reference
    # the fixture's plan holds two tiles: a mirrored one makes the third
    x = np.concatenate([x, np.ascontiguousarray(x[:1, ..., ::-1])])
    run = TorchCudaRunner(bound, x.shape[1:], precision="fp32", max_batch=2, cuda_graphs=graphs)
    alone = [run(x[:2]), run(x[2:]), run(x[1:3])]
    inputs = [list(x[:2].copy()), x[2:].copy(), [t.copy() for t in x[1:3]]]
    queued = [run.launch(b) for b in inputs]
    for b in inputs:  # what a reader's slot does once a batch is queued
        for t in b:
            t[...] = np.nan
    for q, want in zip(queued, alone, strict=True):
        np.testing.assert_allclose(q.result(), want, rtol=0, atol=1e-5)
    check(queued[0].result(), ref, "fp32")
    assert len(run.launch(list(x)).result()) == 3  # over max_batch: chunk by chunk


@gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_cuda_hands_back_float16_rounded_on_the_gpu(reference, precision: str) -> None:
    """`out_dtype="float16"`: the GPU's rounding of the float32 outputs (ties to even, as the
    stitcher rounds), so what the COG stores is unchanged; queued and called, padded or not."""
    from tilefm.backends.torch_cuda import TorchCudaRunner

    bound, x, ref = reference
    full = TorchCudaRunner(bound, x.shape[1:], precision=precision, max_batch=2)(x)
    half = TorchCudaRunner(bound, x.shape[1:], precision=precision, max_batch=2, out_dtype="float16")
    got = half(x)
    assert got.dtype == np.float16 and got.shape == ref.shape
    np.testing.assert_array_equal(got, full.astype(np.float16))
    np.testing.assert_array_equal(half.launch(list(x[:1])).result(), got[:1])


@gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_reference(reference, precision: str, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    from tilefm.backends.tensorrt import tensorrt_runner
    from tilefm.models.vit import state_sha256

    bound, x, ref = reference
    opts = BackendOptions(precision=precision, max_batch=2, engine_cache=str(tmp_path))
    got = tensorrt_runner(bound, x.shape[1:], opts, model_sha256=state_sha256(bound))(x)
    check(got, ref, precision)
    assert len(list(tmp_path.glob("*.engine"))) == 1


@gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")
def test_tensorrt_int8_from_a_calibration_set(reference, scene_dir: Path, tmp_path: Path) -> None:
    """An int8 engine from real calibration tiles (not the tiles it is checked on)."""
    pytest.importorskip("tensorrt")
    from tilefm.backends.tensorrt import tensorrt_runner
    from tilefm.grid import plan_tiles
    from tilefm.io.scene import open_scene
    from tilefm.models.calibrate import make_calibration
    from tilefm.models.vit import state_sha256

    bound, x, ref = reference
    scene = open_scene({"s2": str(scene_dir)})
    cal = make_calibration(get_card("vit-small"), scene, plan_tiles(scene.footprint, 12), tiles=16)
    samples = cal.for_bands(cal.present)
    opts = BackendOptions(precision="int8", max_batch=2, engine_cache=str(tmp_path))
    got = tensorrt_runner(bound, x.shape[1:], opts, model_sha256=state_sha256(bound), calibration=samples)(x)
    check(got, ref, "int8")
    assert rel_err(got, ref) > 1e-4  # int8 layers ran
    assert [p.name.split("-")[3] for p in tmp_path.glob("*.engine")] == ["int8"]


@gpu
@pytest.mark.skipif(not backends.ort_cuda_available(), reason="needs onnxruntime's CUDA execution provider")
def test_onnxruntime_cuda_matches_reference(reference) -> None:
    from tilefm.backends.onnx_export import export_onnx
    from tilefm.backends.onnxruntime import OrtRunner

    bound, x, ref = reference
    run = OrtRunner(export_onnx(bound, x.shape[1:]), device="cuda")
    assert "CUDAExecutionProvider" in run.session.providers
    check(run(x), ref, "fp32")


@gpu
def test_torch_compile_matches_reference(reference) -> None:
    from tilefm.backends.torch_cuda import TorchCudaRunner

    bound, x, ref = reference
    got = TorchCudaRunner(bound, x.shape[1:], precision="bf16", max_batch=2, compile=True)(x)
    check(got, ref, "bf16")


def test_outputs_come_back_in_the_dtype_the_run_stores(model_store: Path) -> None:
    """The job's storage dtype reaches the model: a GPU rounds to float16 only where the COG
    keeps float16 (a float32 or int8 job gets float32); CPU runners stay at float32, where
    rounding would only move work to the thread that feeds the model."""
    from tilefm.engine.runtime import WorkerSpec
    from tilefm.models.store import weights_path

    presto = get_card("presto")
    weights = weights_path(presto, model_store)
    assert WorkerSpec(card=presto, backend="torch", weights=weights).load().out_dtype == torch.float16
    for stored in ("float32", "int8"):
        assert (
            WorkerSpec(card=presto, backend="torch", weights=weights, out_dtype=stored).load().out_dtype
            == torch.float32
        )
    vit = get_card("vit-small")
    assert (
        WorkerSpec(card=vit, backend="torch", weights=None, out_dtype="float16").load().options.out_dtype
        == "float32"
    )
    with pytest.raises(BackendError, match="float16 outputs, not 'bfloat16'"):
        backends.make_runner(
            torch.nn.Identity(),
            "torch",
            (1,),
            backends.BackendOptions(out_dtype="bfloat16"),
            model_sha256=SHA,
        )


@pytest.fixture(scope="module")
def presto_pixels(scene_dir: Path, model_store: Path):
    """One real tile's pixels and Presto's torch fp32 CPU embeddings of them."""
    from tilefm.grid import plan_tiles
    from tilefm.io.read import read_tile
    from tilefm.io.scene import open_scene
    from tilefm.models.presto_tiles import PrestoTileModel
    from tilefm.models.store import weights_path

    scene = open_scene({"s2": str(scene_dir)})
    card = get_card("presto")
    tile = plan_tiles(scene.footprint, 10, bbox=(-11.5, 24.7, -11.3, 24.85)).tiles[0]
    weights = weights_path(card, model_store)
    cpu = PrestoTileModel(card, "torch", weights)
    raw, present, latlons, _ = cpu.pixels(read_tile(scene, card, tile, cpu.read_halo))
    month = scene.date.month - 1
    return card, weights, (raw, present, latlons, month), cpu.embed(raw, present, latlons, month)


@gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_presto_torch_cuda_matches_cpu(presto_pixels, precision: str) -> None:
    from tilefm.models.presto_tiles import PrestoTileModel

    card, weights, inputs, ref = presto_pixels
    got = PrestoTileModel(card, "torch-cuda", weights, precision=precision, out_dtype="float32").embed(
        *inputs
    )
    assert got.shape == ref.shape == (65536, 128)
    check(got, ref, precision)
    # what a job stores: float16 from the GPU, as the COG holds it
    half = PrestoTileModel(card, "torch-cuda", weights, precision=precision).embed(*inputs)
    assert half.dtype == np.float16 and rel_err(half.astype(np.float32), ref) < LIMITS[precision] + 1e-3
    # seven chunks, the last one partial: the two pinned slots are reused, every row lands in place
    chunked = PrestoTileModel(card, "torch-cuda", weights, precision=precision, out_dtype="float32")
    chunked.chunk = 10_000
    many = chunked.embed(*inputs)
    assert many.shape == ref.shape and rel_err(many, ref) < LIMITS[precision], (precision, rel_err(many, ref))
    again = chunked.embed(
        *(a[:12_345] if isinstance(a, np.ndarray) else a for a in inputs)
    )  # the slots, kept
    assert again.shape == (12_345, 128) and rel_err(again, many[:12_345]) < LIMITS[precision]


@gpu
@pytest.mark.integration
@pytest.mark.parametrize("model", ["presto", "vit-small"])
def test_run_on_torch_cuda(scene_dir: Path, tmp_path: Path, model: str) -> None:
    """`tilefm run --backend torch-cuda` end to end: a valid COG that names the backend."""
    import rasterio
    from rio_cogeo import cog_validate

    out = tmp_path / "out.tif"
    r = run_cli(
        "run",
        "--scene",
        f"s2={scene_dir}",
        "--model",
        model,
        "--zoom",
        "10",
        "--bbox=-11.5,24.7,-11.3,24.85",
        "--backend",
        "torch-cuda",
        "--executor",
        "local",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert cog_validate(str(out), quiet=True)[0]
    with rasterio.open(out) as ds:
        assert ds.tags()["TILEFM_BACKEND"] == "torch-cuda"
