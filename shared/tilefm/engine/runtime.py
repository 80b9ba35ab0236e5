"""Where tiles are read and encoded: in this process, or on a Ray cluster.

Both executors take batches of tiles and yield each batch's outputs as soon as it is done, in
any order; the stitcher consumes them as they come. On Ray, reader tasks on CPUs feed encoder
actors (one per model replica, each owning its model and backend); each batch's read is chained
to its encode by object reference, so reading the next batches overlaps encoding this one, and
the number of batches in flight is bounded (backpressure by references, not by sleeping).
Ray is imported only here and only when used.

Why one module (~600 lines): both executors implement one protocol (batches in, outputs out, in
any order) over the same worker spec and batch helpers; Ray's part (placement, encoder pool and
actor) is most of it, and is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tilefm.backends import GPU_BACKENDS, resolve_precision, select_backend
from tilefm.card import ModelCard
from tilefm.engine.readers import PreparedBatch, ProcessReaders, ThreadReaders, read_prepared
from tilefm.errors import BackendError
from tilefm.grid import Tile
from tilefm.io.read import GDAL_ENV, TileInput
from tilefm.io.scene import Scene, on_s3, s3_env
from tilefm.models.base import TileModel, load_tile_model
from tilefm.settings import Settings, get_settings
from tilefm.values import TileOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an encoder worker needs to build its model (picklable, small)."""

    card: ModelCard
    backend: str
    #: None: the card has no checkpoint (seeded init)
    weights: Path | None
    threads: int | None = None
    #: the run's precision; None or `auto`: TILEFM_PRECISION's choice for the backend
    precision: str | None = None
    #: the dtype the run stores embeddings in (the job's `dtype`; None: the card's)
    out_dtype: str | None = None

    def load(self) -> TileModel:
        return load_tile_model(
            self.card,
            self.backend,
            self.weights,
            threads=self.threads,
            precision=self.precision,
            out_dtype=self.out_dtype,
        )


def run_prepared(model: TileModel, batch: PreparedBatch) -> list[TileOutput]:
    """Run the model on a prepared batch; each output notes its tile's read seconds and its
    share of the run (for the stage metrics)."""
    return launch_prepared(model, batch)()


def launch_prepared(model: TileModel, batch: PreparedBatch) -> Callable[[], list[TileOutput]]:
    """`run_prepared` in two steps (`TileModel.launch`): queue the batch, then finish it. The
    encode seconds are the launch's and the finish's (a GPU's time between them overlaps the
    next batch's launch)."""
    read_s = batch.read_s
    t0 = time.perf_counter()
    finish = model.launch(batch.prepared)
    launched = time.perf_counter() - t0

    def done() -> list[TileOutput]:
        t1 = time.perf_counter()
        outputs = finish()
        share = (launched + time.perf_counter() - t1) / max(len(outputs), 1)
        for out, seconds in zip(outputs, read_s, strict=True):
            out.read_s, out.encode_s = seconds, share
        return outputs

    return done


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def local_threads(on_gpu: bool, cpus: int | None = None) -> tuple[int, int]:
    """Default (reader processes or threads, COG threads) for a local run on `cpus` cores.
    On a GPU host the cores are the readers': three quarters of them read (the device thread
    and the stitcher take the rest; the mosaic's threads mostly wait, so 3/8 of the cores for
    them oversubscribe a little), what the H200 runs in docs/benchmarks.md were measured with
    (12 readers and 6 COG threads on 16 cores); four readers there left the GPU waiting. On a
    CPU the model needs the cores itself: up to 4 of each. At most 16 readers and 8 COG threads:
    enough for ~2000 tiles/s, and each reader's batches in flight hold shared memory."""
    cpus = cpus or cpu_count()
    if not on_gpu:
        return min(4, cpus), min(4, cpus)
    return min(16, max(1, cpus - max(2, cpus // 4))), min(8, max(min(4, cpus), 3 * cpus // 8))


class LocalExecutor:
    """One process feeding the model: readers read ahead and prepare the model's input
    (`TileModel.prepare`), one device thread only runs the model (queueing each batch before it
    finishes the one before, `TileModel.launch`), and the caller stitches what comes out (the
    sampler, GDAL, numpy and the backends release the GIL). The readers are threads, or
    processes that hand batches over through shared memory (`tilefm.engine.readers`: `kind` auto takes
    processes where the model runs on a GPU, which leaves the host's cores to the readers and
    needs more reads per second than one GIL allows). Batches come back in plan order; at most
    `readers + prefetch` are read ahead and `prefetch` encoded ones wait for the caller, so
    memory stays bounded however fast either side is."""

    name = "local"

    def __init__(
        self,
        worker: WorkerSpec,
        *,
        readers: int = 0,
        prefetch: int = 2,
        kind: str = "auto",
        model: TileModel | None = None,
    ):
        """`readers`: 0 for `local_threads`'s count (it depends on whether the model is on a GPU)."""
        self.model = model or worker.load()
        self.readers = readers if readers > 0 else local_threads(self.on_gpu)[0]
        self.prefetch = max(1, prefetch)
        if kind == "auto":
            kind = "process" if self.on_gpu else "thread"
        if kind not in ("thread", "process"):
            raise ValueError(f"unknown reader kind {kind!r} (auto, thread or process)")
        # every batch read ahead, plus the one the device thread runs
        self.reads: ThreadReaders | ProcessReaders = (
            ProcessReaders(self.readers, self.readers + self.prefetch + 1)
            if kind == "process"
            else ThreadReaders(self.readers, self.model.prepare)
        )

    @property
    def backend(self) -> str:
        return self.model.backend

    @property
    def on_gpu(self) -> bool:
        return bool(getattr(self.model, "on_gpu", False))

    @property
    def readers_desc(self) -> str:
        kind = (
            self.reads.kind
            if self.readers == 1
            else {"thread": "threads", "process": "processes"}[self.reads.kind]
        )
        return f"{self.readers} reader {kind}"

    @property
    def batch_size(self) -> int | None:
        return self.model.batch_size()

    @property
    def precision(self) -> str:
        return self.model.precision

    def warm(self, modalities: Iterable[str], bands: Mapping[str, float | None] | None = None) -> None:
        self.model.warm(modalities, bands)

    def map(self, scene: Scene, batches: Iterable[list[Tile]]) -> Iterator[list[TileOutput]]:
        halo, model, reads = self.model.read_halo, self.model, self.reads
        warp = get_settings().warp
        ahead = self.readers + self.prefetch
        done: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            """Hand an item to the caller; False once the caller has gone."""
            while not stop.is_set():
                try:
                    done.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def launch(fut: Future[Any]) -> Callable[[], list[TileOutput]]:
            with reads.claim(fut) as prepared:
                return launch_prepared(model, prepared)

        def feed() -> None:
            pending: deque[Future[Any]] = deque()
            # the batch the model has queued: finished once the next one is queued behind it
            # (a GPU runs it while this thread copies the next one in)
            queued: Callable[[], list[TileOutput]] | None = None

            def step() -> bool:
                nonlocal queued
                last, queued = queued, launch(pending.popleft())
                return last is None or put(last())

            reads.start()
            try:
                for batch in batches:
                    pending.append(reads.submit(scene, model.card, batch, halo, warp))
                    if len(pending) > ahead and not step():
                        return
                while pending:
                    if not step():
                        return
                if queued is not None and not put(queued()):
                    return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                put(e)
            finally:
                reads.stop(list(pending))

        device = threading.Thread(target=feed, name="tilefm-device", daemon=True)
        device.start()
        try:
            while True:
                item = done.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            device.join()

    def close(self) -> None:
        self.reads.close()


#: the device thread's last item
_END = object()


def ensure_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Any:
    """Connect to `address`, or start a local cluster once per process (`num_gpus`: the GPUs it
    declares; default: those Ray detects)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = dict(
            logging_level=logging.WARNING,
            log_to_driver=True,
            configure_logging=True,
        )
        if address and address.startswith("ray://"):
            _client_connect(ray, address, kwargs)
        elif address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or cpu_count(), num_gpus=num_gpus, include_dashboard=False, **kwargs)
    return ray


#: tries of a Ray Client connection whose server-side session fails to start
CLIENT_CONNECT_TRIES = 3


def _client_connect(ray: Any, address: str, kwargs: dict[str, Any]) -> None:
    """`ray.init` through Ray Client, tried again where the head's proxy could not start this
    client's server process (`ConnectionAbortedError`; on a loaded head that start can fail once
    and work the next time). Other errors (no head at `address`, auth) are raised at once."""
    for attempt in range(1, CLIENT_CONNECT_TRIES + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except ConnectionAbortedError as e:
            if attempt == CLIENT_CONNECT_TRIES:
                raise
            log.warning(
                "Ray Client at %s: %s; trying again (%d of %d)",
                address,
                str(e).strip().splitlines()[0],
                attempt + 1,
                CLIENT_CONNECT_TRIES,
            )
            with contextlib.suppress(Exception):
                ray.shutdown()
            time.sleep(2.0 * attempt)


def connect(settings: Settings) -> Any:
    return ensure_ray(settings.ray_address, settings.ray_num_cpus, settings.ray_num_gpus)


def remote_reader(ray: Any, settings: Settings) -> Any:
    """The tile reader as a Ray task (retried on worker loss): reads and prepares the model's
    input, so the encoder actor's thread only runs the model."""
    return ray.remote(num_cpus=settings.reader_num_cpus, max_retries=3)(read_prepared_in_worker)


def read_prepared_in_worker(scene: Scene, card: ModelCard, tiles: list[Tile], halo: int) -> PreparedBatch:
    """`read_prepared` in a Ray worker, whose freed arrays stay in its heap for the next batch
    (`tilefm.engine.memory`: ~20% of a ViT tile's read was page faults)."""
    from tilefm.engine.memory import retain_freed_memory

    retain_freed_memory()
    # a job's s3:// scene is read with the service's endpoint and keys, which a worker's GDAL
    # does not otherwise know
    with s3_env(None, **GDAL_ENV) if on_s3(scene) else contextlib.nullcontext():
        return read_prepared(scene, card, tiles, halo)


@dataclass(frozen=True)
class Placement:
    """How one model's encoder actors sit on the cluster."""

    replicas: int
    #: GPUs each actor reserves (0: a CPU actor)
    num_gpus: float
    #: what each actor is asked to run: the driver's choice on CPUs; on GPUs the backend asked
    #: for, `auto` resolved by the actor on its own host (the driver may have no GPU at all)
    backend: str
    #: batches outstanding per actor: enough on a GPU for every reader slot to hold one
    in_flight: int


def place_encoders(
    worker: WorkerSpec, requested: str, settings: Settings, cluster: dict[str, float]
) -> Placement:
    """One actor per GPU where the cluster has GPUs and the model can use one (`requested` is
    `auto` or a GPU backend); otherwise CPU actors running the driver's backend. With
    `encoder_num_gpus` set, actors ask for GPUs even if the cluster has none yet (an autoscaler
    adds them; `start_encoders` gives up after `encoder_start_timeout_s`)."""
    gpus = float(cluster.get("GPU", 0))
    each = settings.encoder_num_gpus
    if each is None:
        each = 1.0 if gpus >= 1 else 0.0
    # onnxruntime too: on a GPU host with onnxruntime-gpu it runs on CUDA
    card_gpu = any(b in worker.card.backends for b in (*GPU_BACKENDS, "onnxruntime"))
    # int8 is ONNX Runtime's CPU kernels (a GPU would sit idle), unless TensorRT was asked for
    int8_cpu = worker.precision == "int8" and requested != "tensorrt"
    wants_gpu = not int8_cpu and (requested in GPU_BACKENDS or (requested == "auto" and card_gpu))
    if each > 0 and wants_gpu:
        replicas = settings.encoder_replicas or max(1, int(gpus // each))
        slots = int(float(cluster.get("CPU", 1)) // max(settings.reader_num_cpus, 1e-3))
        in_flight = settings.encoder_in_flight or max(2, -(-slots // replicas))
        return Placement(replicas, each, requested, in_flight)
    return Placement(settings.encoder_replicas or 1, 0.0, worker.backend, settings.encoder_in_flight or 2)


@dataclass
class EncoderPool:
    """A model's encoder actors and what they reported once loaded (None until `wait`)."""

    actors: list[Any]
    placement: Placement
    infos: list[EncoderInfo] | None = None

    @property
    def backend(self) -> str:
        """The backend the actors run (their own answer where they resolved it)."""
        if not self.infos:
            return self.placement.backend
        return ",".join(sorted({i.backend for i in self.infos}))

    @property
    def batch_size(self) -> int | None:
        """Tiles per batch the actors' devices take at once (the smallest), None if unknown."""
        sizes = [i.batch_size for i in self.infos or [] if i.batch_size]
        return min(sizes) if sizes else None

    def precision(self, worker: WorkerSpec) -> str:
        """The precision the actors run (their answer once loaded, else what they will resolve)."""
        if self.infos:
            return ",".join(sorted({i.precision for i in self.infos}))
        if self.placement.backend == "auto":
            return worker.precision or "auto"
        return resolve_precision(
            worker.card, self.placement.backend, worker.precision or get_settings().precision
        )


def start_encoders(
    ray: Any, worker: WorkerSpec, settings: Settings, *, requested: str | None = None, wait: bool = True
) -> EncoderPool:
    """Encoder actors for one model, restarted by Ray if they die (their tasks retried), placed
    by `place_encoders`. With `wait` (always on GPUs, where the actors pick their backend and
    batch), returns once every replica has loaded its model; without, the first reads overlap
    the model load (weights were already verified, and a load error surfaces at the first batch)."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    placement = place_encoders(worker, requested or worker.backend, settings, ray.cluster_resources())
    extra = {"resources": dict(settings.encoder_resources)} if settings.encoder_resources else {}
    actor_cls = ray.remote(
        num_cpus=settings.encoder_num_cpus,
        num_gpus=placement.num_gpus,
        max_restarts=3,
        max_task_retries=3,
        **extra,
    )(EncoderActor)
    spec = replace(worker, backend=placement.backend)
    pool = EncoderPool([actor_cls.remote(spec) for _ in range(placement.replicas)], placement)
    if wait or placement.num_gpus:
        try:
            pool.infos = ray.get(
                [a.info.remote() for a in pool.actors], timeout=settings.encoder_start_timeout_s
            )
        except GetTimeoutError:
            for a in pool.actors:
                ray.kill(a)
            where = unplaceable(ray, settings, placement)
            raise BackendError(
                f"{placement.replicas} encoder actor(s) for {worker.card.name!r} wanting "
                f"{placement.num_gpus:g} GPU(s) each "
                f"were not running after {settings.encoder_start_timeout_s:g} s (the cluster has "
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs{'; ' + where if where else ''}; see "
                "TILEFM_ENCODER_NUM_GPUS, "
                "TILEFM_ENCODER_RESOURCES, TILEFM_ENCODER_REPLICAS)",
                field="backend",
            ) from None
        except (RayActorError, RayTaskError) as e:  # the model did not load there (after Ray's restarts)
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            raise BackendError(
                f"encoder actors for {worker.card.name!r} on {placement.backend!r} failed to start: {last}",
                field="backend",
            ) from None
        log.info("encoders for %s: %s", worker.card.name, "; ".join(map(str, pool.infos)))
        idle = [i for i in pool.infos if i.gpu_ids and not i.on_gpu]
        if idle:
            log.warning(
                "%d encoder actor(s) for %s hold a GPU but run %s on the CPU (the GPU stays idle): "
                "install what that backend needs on the GPU workers, or set TILEFM_ENCODER_NUM_GPUS=0",
                len(idle),
                worker.card.name,
                idle[0].backend,
            )
    return pool


def encoder_needs(settings: Settings, placement: Placement) -> dict[str, float]:
    """What one encoder actor reserves on its node."""
    needs = {"CPU": settings.encoder_num_cpus, "GPU": placement.num_gpus, **settings.encoder_resources}
    return {k: float(v) for k, v in needs.items() if v}


def unplaceable(ray: Any, settings: Settings, placement: Placement) -> str | None:
    """None where a live node of the cluster could hold one of the encoder actors (free or not),
    else why none can: what an actor needs and what the live nodes have. Actors that lost their
    node wait for one that can take them (Ray restarts them there), so a job whose only
    encoder node is gone would otherwise wait forever."""
    needs = encoder_needs(settings, placement)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in needs.items()) for n in nodes):
        return None
    have = [{k: n.get("Resources", {}).get(k, 0.0) for k in needs} for n in nodes]
    return (
        f"no node of the Ray cluster can take an encoder actor: each needs {needs}; the {len(nodes)} live "
        f"node(s) have {have}"
    )


class RayExecutor:
    """Reader tasks feed encoder actors; at most `in_flight` batches per actor are outstanding."""

    name = "ray"

    def __init__(self, worker: WorkerSpec, settings: Settings, *, requested: str | None = None):
        ray = connect(settings)
        self.ray = ray
        self._read = remote_reader(ray, settings)
        self.worker = worker
        self.pool = start_encoders(ray, worker, settings, requested=requested, wait=False)
        self.actors = self.pool.actors
        self.halo = worker.card.context.halo
        self.in_flight = self.pool.placement.in_flight
        self.card = worker.card

    @property
    def backend(self) -> str:
        return self.pool.backend

    readers_desc = "Ray reader tasks"

    @property
    def batch_size(self) -> int | None:
        return self.pool.batch_size

    @property
    def precision(self) -> str:
        return self.pool.precision(self.worker)

    def warm(self, modalities: Iterable[str], bands: Mapping[str, float | None] | None = None) -> None:
        """Every actor builds its runner ahead of its first batch. Actors that have loaded (GPU
        ones) build it now, before any read, and a failure there is a load error; actors still
        loading (CPU ones) get it queued ahead of their first batch (an actor runs its calls in
        order), so the first reads overlap the load as before, and a failure comes back from
        the first batch."""
        from ray.exceptions import RayActorError, RayTaskError

        mods = list(modalities)
        have = dict(bands) if bands is not None else None
        refs = [a.warm.remote(mods, have) for a in self.actors]
        if not self.pool.infos:
            return
        try:
            self.ray.get(refs)
        except (RayActorError, RayTaskError) as e:
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            raise BackendError(
                f"encoder actors for {self.card.name!r} could not build their model: {last}", field="backend"
            ) from None

    def map(self, scene: Scene, batches: Iterable[list[Tile]]) -> Iterator[list[TileOutput]]:
        ray = self.ray
        scene_ref = ray.put(scene)
        card = self.card
        pending: dict[Any, int] = {}
        load = [0] * len(self.actors)
        limit = self.in_flight * len(self.actors)
        it = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                batch = next(it, None)
                if batch is None:
                    exhausted = True
                    break
                i = min(range(len(self.actors)), key=load.__getitem__)
                inputs = self._read.remote(scene_ref, card, batch, self.halo)
                pending[self.actors[i].encode.remote(inputs)] = i
                load[i] += 1
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                load[pending.pop(ref)] -= 1
                yield ray.get(ref)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder actor runs, as it reports it once loaded."""

    backend: str
    precision: str
    #: Ray's GPU ids for the actor (empty on a CPU actor) and where it runs
    gpu_ids: tuple[str, ...]
    host: str
    pid: int
    #: tiles per batch its device takes at once (None: no preference)
    batch_size: int | None
    read_halo: int
    #: whether the model computes on a GPU (False on a GPU actor: the GPU sits idle)
    on_gpu: bool = False
    #: tiles it has encoded since it (re)started
    encoded: int = 0

    def __str__(self) -> str:
        gpus = f" GPU {','.join(self.gpu_ids)}" if self.gpu_ids else ""
        where = "GPU" if self.on_gpu else "CPU"
        return (
            f"{self.backend} ({self.precision}, {where}) on {self.host}:{self.pid}{gpus}, batch "
            f"{self.batch_size or '-'}"
        )


class EncoderActor:
    """Owns one model on one backend (one per GPU on a GPU cluster). A backend of `auto` is
    resolved here, on the host that runs the model."""

    def __init__(self, worker: WorkerSpec):
        if worker.backend == "auto":
            worker = replace(
                worker, backend=select_backend(worker.card, "auto", precision=worker.precision or "auto")
            )
        self.worker = worker
        self.model = worker.load()
        self.encoded = 0

    def info(self) -> EncoderInfo:
        import socket

        import ray

        return EncoderInfo(
            backend=self.model.backend,
            precision=self.model.precision,
            gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()),
            host=socket.gethostname(),
            pid=os.getpid(),
            batch_size=self.model.batch_size(),
            read_halo=self.model.read_halo,
            on_gpu=self.model.on_gpu,
            encoded=self.encoded,
        )

    def warm(self, modalities: list[str], bands: dict[str, float | None] | None = None) -> None:
        self.model.warm(modalities, bands)

    def encode(self, inputs: PreparedBatch | list[TileInput]) -> list[TileOutput]:
        """Run the model on a prepared batch (from `read_prepared`), or read tiles."""
        if not isinstance(inputs, PreparedBatch):
            inputs = PreparedBatch(self.model.prepare(inputs), [t.read_s for t in inputs])
        outputs = run_prepared(self.model, inputs)
        self.encoded += len(outputs)
        return outputs


def make_executor(
    kind: str, worker: WorkerSpec, settings: Settings, *, requested: str | None = None
) -> LocalExecutor | RayExecutor:
    """`requested`: the backend the user asked for (`auto`, say), which GPU encoder actors
    resolve on their own host."""
    if kind == "local":
        return LocalExecutor(worker, readers=settings.local_readers, kind=settings.local_reader_kind)
    if kind == "ray":
        return RayExecutor(worker, settings, requested=requested)
    raise ValueError(f"unknown executor {kind!r}")
