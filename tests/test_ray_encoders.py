"""Encoder actors on Ray: one per GPU where the cluster has GPUs (the backend then resolved on
the actor's host), CPU actors otherwise, readers in flight enough to feed them, and the batch a
GPU's memory holds. The placement runs on a real local Ray cluster that declares two logical
GPUs (Ray hands each actor its own GPU id; where PyTorch sees no CUDA the actors resolve
`auto` to a CPU backend and say so)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tilefm.backends import select_backend
from tilefm.backends.torch_cuda import batch_for_memory
from tilefm.engine.runtime import WorkerSpec, place_encoders
from tilefm.errors import BackendError
from tilefm.models import get_card
from tilefm.settings import Settings

CUDA = torch.cuda.is_available()
GIB = 1 << 30


def worker(model: str, backend: str) -> WorkerSpec:
    return WorkerSpec(card=get_card(model), backend=backend, weights=None)


def test_one_encoder_per_gpu_where_the_model_can_use_one() -> None:
    s = Settings()
    gpu_cluster = {"CPU": 16.0, "GPU": 2.0}
    p = place_encoders(worker("vit-base", "torch"), "auto", s, gpu_cluster)
    assert (p.replicas, p.num_gpus, p.backend) == (2, 1.0, "auto")
    # every reader slot (16 CPUs / 0.5 per read = 32) holds a batch for one of the 2 GPUs
    assert p.in_flight == 16
    # an explicit GPU backend goes to the GPUs as asked
    assert place_encoders(worker("presto", "torch-cuda"), "torch-cuda", s, gpu_cluster).num_gpus == 1.0
    # the cloud model (ONNX) takes a GPU too: onnxruntime runs on CUDA where the host has it
    assert place_encoders(worker("ukis-csmask", "onnxruntime"), "auto", s, gpu_cluster).num_gpus == 1.0


def test_cpu_encoders_where_there_is_no_gpu_or_a_cpu_backend_was_asked() -> None:
    s = Settings()
    cpu = place_encoders(worker("vit-base", "torch"), "auto", s, {"CPU": 2.0})
    assert (cpu.replicas, cpu.num_gpus, cpu.backend, cpu.in_flight) == (1, 0.0, "torch", 2)
    asked = place_encoders(worker("vit-base", "torch"), "torch", s, {"CPU": 16.0, "GPU": 4.0})
    assert (asked.replicas, asked.num_gpus, asked.backend) == (1, 0.0, "torch")
    off = place_encoders(
        worker("vit-base", "torch"), "auto", Settings(encoder_num_gpus=0), {"CPU": 16.0, "GPU": 4.0}
    )
    assert off.num_gpus == 0.0
    # int8 runs on ONNX Runtime's CPU kernels: an actor holding a GPU would leave it idle
    int8 = WorkerSpec(card=get_card("vit-base"), backend="onnxruntime", weights=None, precision="int8")
    p = place_encoders(int8, "auto", s, {"CPU": 16.0, "GPU": 4.0})
    assert (p.num_gpus, p.backend) == (0.0, "onnxruntime")


def test_placement_settings() -> None:
    cluster = {"CPU": 8.0, "GPU": 2.0}
    half = place_encoders(worker("vit-base", "torch"), "auto", Settings(encoder_num_gpus=0.5), cluster)
    assert (half.replicas, half.num_gpus) == (4, 0.5)
    fixed = place_encoders(
        worker("vit-base", "torch"), "auto", Settings(encoder_replicas=1, encoder_in_flight=3), cluster
    )
    assert (fixed.replicas, fixed.in_flight) == (1, 3)
    # GPUs asked for explicitly: placed even on a cluster with none yet (an autoscaled GPU group
    # starts a node for it; start_encoders gives up after encoder_start_timeout_s)
    later = place_encoders(worker("vit-base", "torch"), "auto", Settings(encoder_num_gpus=1), {"CPU": 2.0})
    assert (later.replicas, later.num_gpus, later.backend) == (1, 1.0, "auto")


def test_a_gpu_backend_is_left_to_a_remote_clusters_workers() -> None:
    """A driver without CUDA (the job API, the scheduler) accepts a GPU backend the card allows
    when the encoders run on a remote cluster, and still refuses one the card does not list."""
    vit = get_card("vit-base")
    if not CUDA:
        with pytest.raises(BackendError, match="needs a CUDA GPU"):
            select_backend(vit, "torch-cuda")
    assert select_backend(vit, "torch-cuda", remote=True) == "torch-cuda"
    with pytest.raises(BackendError, match="cannot run on 'torch-cuda'"):
        select_backend(get_card("ukis-csmask"), "torch-cuda", remote=True)
    with pytest.raises(BackendError, match="unknown backend"):
        select_backend(vit, "cuda", remote=True)


def test_batch_for_memory() -> None:
    # 80 GiB free, 100 MiB a sample: half the memory holds 409 samples -> capped at 64
    assert batch_for_memory(80 * GIB, 100 << 20) == 64
    assert batch_for_memory(80 * GIB, 100 << 20, cap=1024) == 256
    # 4 GiB free, 300 MiB a sample, 1 GiB fixed: (2 - 1) GiB / 300 MiB = 3.4 -> 2
    assert batch_for_memory(4 * GIB, 300 << 20, 1 * GIB) == 2
    # nothing fits: still one at a time (the runner's own error says what went wrong)
    assert batch_for_memory(1 * GIB, 4 * GIB) == 1
    assert batch_for_memory(0, 0) == 1


class _FlakyClient:
    """Stands in for Ray's module where only a Ray Client head could say no: its proxy failing to
    start this client's server `fails` times, as a loaded head does now and then."""

    def __init__(self, fails: int, error: type[Exception] = ConnectionAbortedError):
        self.fails, self.error, self.inits, self.shutdowns = fails, error, 0, 0

    def init(self, address: str, **kwargs) -> None:
        self.inits += 1
        if self.inits <= self.fails:
            raise self.error("Initialization failure from server:\nStarting Ray client server failed.")

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_ray_client_connection_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from tilefm.engine import runtime

    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    flaky = _FlakyClient(fails=runtime.CLIENT_CONNECT_TRIES - 1)
    runtime._client_connect(flaky, "ray://head:10001", {})
    assert flaky.inits == runtime.CLIENT_CONNECT_TRIES
    # a server that never starts: the last error, after the last try
    never = _FlakyClient(fails=99)
    with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
        runtime._client_connect(never, "ray://head:10001", {})
    assert never.inits == runtime.CLIENT_CONNECT_TRIES
    # no head there: at once
    nobody = _FlakyClient(fails=99, error=ConnectionError)
    with pytest.raises(ConnectionError):
        runtime._client_connect(nobody, "ray://head:10001", {})
    assert nobody.inits == 1


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray
    from tilefm.grid import plan_tiles
    from tilefm.models import get_card
    from tilefm.engine.pipeline import batches
    from tilefm.io.read import read_tiles
    from tilefm.engine.runtime import RayExecutor, WorkerSpec
    from tilefm.io.scene import open_scene
    from tilefm.settings import Settings

    settings = Settings(ray_num_cpus=2, ray_num_gpus=2)

    def timeout_error():
        # actors wanting more GPUs than the cluster has: a clear error, not a hang
        from tilefm.engine.runtime import start_encoders
        try:
            start_encoders(ray, WorkerSpec(card=get_card("vit-small"), backend="torch", weights=None),
                           Settings(encoder_num_gpus=4, encoder_start_timeout_s=3), requested="auto")
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    card = get_card("vit-small")
    scene = open_scene({"s2": sys.argv[1]})
    tiles = plan_tiles(scene.footprint, 11, bbox=(-11.5, 24.7, -11.3, 24.85)).tiles
    # the driver's own choice (torch here) is not what GPU actors run: they resolve `auto` on their host
    ex = RayExecutor(WorkerSpec(card=card, backend="torch", weights=None), settings, requested="auto")
    outs = [o for batch in ex.map(scene, batches(tiles, 1)) for o in batch]
    infos = ray.get([a.info.remote() for a in ex.actors])
    model = WorkerSpec(card=card, backend=infos[0].backend, weights=None).load()
    ref = {o.tile: o for o in model.encode(read_tiles(scene, card, tiles, 0))}
    # relative: the actors' torch runs on other thread counts, so sums differ in the last bits
    err = max(
        float(np.abs(o.values - ref[o.tile].values).max() / np.abs(ref[o.tile].values).max()) for o in outs
    )
    # to a file: Ray's autoscaler prints to the driver's stdout (the 4-GPU request) at any moment
    open(sys.argv[2], "w").write(json.dumps({
        "placement": ex.pool.placement.__dict__, "backend": ex.backend, "tiles": len(tiles),
        "outputs": sorted(str(o.tile) for o in outs), "planned": sorted(str(t) for t in tiles),
        "infos": [dict(i.__dict__) for i in infos], "max_rel_err": err, "timeout": timeout_error(),
    }))
    ex.close()
    """
)


@pytest.mark.integration
def test_encoders_on_logical_gpus_of_a_real_ray_cluster(scene_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")  # a GPU host may run the GPU tests without Ray installed
    out = tmp_path / "got.json"
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(scene_dir), str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["placement"]["replicas"] == 2 and got["placement"]["num_gpus"] == 1.0, got
    infos = got["infos"]
    # each actor holds its own GPU, and both did work
    assert sorted(tuple(i["gpu_ids"]) for i in infos) == [("0",), ("1",)], infos
    assert all(i["encoded"] > 0 for i in infos), infos
    assert sum(i["encoded"] for i in infos) == got["tiles"], infos
    # no CUDA behind those ids here: `auto` resolved on the actors to the card's CPU backend
    assert {i["backend"] for i in infos} == {select_backend(get_card("vit-small"), "auto")}
    # ... and they say that they compute on the CPU, and the driver warned that the GPUs sit idle
    assert not any(i["on_gpu"] for i in infos)
    assert "2 encoder actor(s) for vit-small hold a GPU but run onnxruntime on the CPU" in r.stderr
    # and the executor reports theirs (the output's TILEFM_BACKEND tag), not the driver's
    assert got["backend"] == infos[0]["backend"] != "torch"
    # every planned tile exactly once, values as the same model computes them in-process
    assert got["outputs"] == got["planned"]
    assert got["max_rel_err"] < 1e-5, got["max_rel_err"]
    assert got["timeout"] and got["timeout"].startswith(
        "BackendError: backend: 1 encoder actor(s) for 'vit-small' wanting 4 GPU(s) each were not running "
        "after 3 s"
    )
    assert "the cluster has 2 GPUs" in got["timeout"], got["timeout"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_probe_batch_on_a_gpu() -> None:
    from tilefm.backends.torch_cuda import probe_batch
    from tilefm.models.vit import card_wavelengths, load_vit

    card = get_card("vit-base")
    bound = load_vit(card, None).bind(card_wavelengths(card))
    n = probe_batch(bound, (len(card_wavelengths(card)), 256, 256), precision="bf16", cap=64)
    assert 1 <= n <= 64 and n & (n - 1) == 0
    assert next(bound.parameters()).device.type == "cpu"  # left where it was
