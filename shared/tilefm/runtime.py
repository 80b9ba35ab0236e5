"""Where tiles are read and encoded: in this process, or on a Ray cluster.

Both executors take batches of tiles and yield each batch's outputs as soon as it is done, in
any order; the stitcher consumes them as they come. On Ray, reader tasks on CPUs feed encoder
actors (one per model replica, each owning its model and backend); each batch's read is chained
to its encode by object reference, so reading the next batches overlaps encoding this one, and
the number of batches in flight is bounded (backpressure by references, not by sleeping).
Ray is imported only here and only when used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilefm.grid import Tile
from tilefm.models.base import TileModel, TileOutput, load_tile_model
from tilefm.models.card import ModelCard
from tilefm.read import TileInput, read_tiles
from tilefm.scene import Scene
from tilefm.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an encoder worker needs to build its model (picklable, small)."""

    card: ModelCard
    backend: str
    #: None: the card has no checkpoint (seeded init)
    weights: Path | None
    threads: int | None = None

    def load(self) -> TileModel:
        return load_tile_model(self.card, self.backend, self.weights, threads=self.threads)


def read_batch(scene: Scene, card: ModelCard, tiles: list[Tile], halo: int) -> list[TileInput]:
    return read_tiles(scene, card, tiles, halo)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


class LocalExecutor:
    """One process: reader threads read ahead while the model encodes (GDAL and the backends
    release the GIL). Batches come back in plan order; at most `readers + prefetch` are read
    ahead, so memory stays bounded however fast the readers are."""

    name = "local"

    def __init__(self, worker: WorkerSpec, *, readers: int = 1, prefetch: int = 2):
        self.model = worker.load()
        self.readers = max(1, readers)
        self.prefetch = prefetch

    def map(self, scene: Scene, batches: Iterable[list[Tile]]) -> Iterator[list[TileOutput]]:
        halo = self.model.read_halo
        ahead = self.readers + self.prefetch
        with ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="tilefm-read") as pool:
            queue: list[Future[list[TileInput]]] = []
            for batch in batches:
                queue.append(pool.submit(read_batch, scene, self.model.card, batch, halo))
                if len(queue) > ahead:
                    yield self.model.encode(queue.pop(0).result())
            while queue:
                yield self.model.encode(queue.pop(0).result())

    def close(self) -> None:
        pass


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to `address`, or start a local cluster once per process."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = dict(
            logging_level=logging.WARNING, log_to_driver=True, configure_logging=True,
        )
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or cpu_count(), include_dashboard=False, **kwargs)
    return ray


def remote_reader(ray: Any, settings: Settings) -> Any:
    """The tile reader as a Ray task (retried on worker loss)."""
    return ray.remote(num_cpus=settings.reader_num_cpus, max_retries=3)(read_batch)


def start_encoders(ray: Any, worker: WorkerSpec, settings: Settings, replicas: int = 1, *, wait: bool = True) -> list[Any]:
    """Encoder actors for one model, restarted by Ray if they die (their tasks retried). With
    `wait`, returns once every replica has loaded its model; without, the first reads overlap
    the model load (weights were already verified, and a load error surfaces at the first batch)."""
    actor_cls = ray.remote(num_cpus=settings.encoder_num_cpus, max_restarts=3, max_task_retries=3)(EncoderActor)
    actors = [actor_cls.remote(worker) for _ in range(replicas)]
    if wait:
        ray.get([a.ready.remote() for a in actors])
    return actors


class RayExecutor:
    """Reader tasks feed encoder actors; at most `in_flight` batches per actor are outstanding."""

    name = "ray"

    def __init__(self, worker: WorkerSpec, settings: Settings, *, replicas: int = 1, in_flight: int = 2):
        ray = ensure_ray(settings.ray_address, settings.ray_num_cpus)
        self.ray = ray
        self._read = remote_reader(ray, settings)
        self.actors = start_encoders(ray, worker, settings, replicas, wait=False)
        self.halo = worker.card.context.halo
        self.in_flight = in_flight
        self.card = worker.card

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


class EncoderActor:
    """Owns one model on one backend (one per GPU on a GPU cluster)."""

    def __init__(self, worker: WorkerSpec):
        self.worker = worker
        self.model = worker.load()

    def ready(self) -> int:
        """The read halo the model needs; calling it also proves the model loaded."""
        return self.model.read_halo

    def encode(self, inputs: list[TileInput]) -> list[TileOutput]:
        t0 = time.perf_counter()
        outputs = self.model.encode(inputs)
        share = (time.perf_counter() - t0) / max(len(outputs), 1)
        for out, inp in zip(outputs, inputs):
            out.read_s, out.encode_s = inp.read_s, share
        return outputs


def make_executor(kind: str, worker: WorkerSpec, settings: Settings) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(worker, readers=settings.local_readers or min(4, cpu_count()))
    if kind == "ray":
        return RayExecutor(worker, settings)
    raise ValueError(f"unknown executor {kind!r}")
