"""Where the local executor reads: reader threads, or reader processes.

Why processes: a reader thread holds Python's GIL for part of each tile (numpy and the sampler's
bookkeeping between the calls that release it: ~1-2 ms of a vit-base tile's ~6 ms by py-spy's
samples), and the thread that stitches needs it too, so one process cannot read more than a few
hundred tiles/s however many cores it has: well short of the ~1000 tiles/s ViT-B runs on one
H100. Reader processes each have their own GIL.

Why shared memory: a prepared batch of 32 ViT tiles is ~90 MB. Sent through a pipe it is copied
three times in the receiving process (pipe, bytes, arrays), with the GIL held, which costs about as
much as the read it saves. So each batch in flight owns a slot: a file in /dev/shm that the reader
process writes the batch's arrays into (pickle protocol 5's out-of-band buffers) and the feeding
process maps, so the arrays it hands the model are views of that memory, not copies. A slot is
given back once the model has run its batch, and a slot too small for a batch is replaced by the
reader that found it so, at the size it needed. Where no space is left (a container's small
/dev/shm), the batch comes back through the pipe instead: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import sys
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tilefm.card import ModelCard
from tilefm.grid import Tile
from tilefm.io.native import read_native
from tilefm.io.read import TileInput, read_tiles
from tilefm.io.scene import Scene
from tilefm.models.base import input_preparer

log = logging.getLogger(__name__)

#: byte alignment of each array in a slot (numpy wants its dtype's; 64 suits SIMD loads too)
ALIGN = 64
#: a slot grows to what a batch needed plus this share, so that slightly larger batches fit
HEADROOM = 1.125


def shm_dir() -> Path:
    """RAM-backed files where the OS has them (Linux), the temporary folder elsewhere."""
    d = Path("/dev/shm")  # noqa: S108 - RAM on purpose; names carry the pid and a random part
    return d if d.is_dir() and os.access(d, os.W_OK) else Path(tempfile.gettempdir())


@dataclass
class PreparedBatch:
    """A batch read and prepared for its model (`input_preparer`), as a reader task hands it
    to an encoder actor: the actor only runs the model."""

    prepared: Any
    read_s: list[float]


def read_prepared(
    scene: Scene,
    card: ModelCard,
    tiles: list[Tile],
    halo: int,
    prepare: Callable[[list[TileInput]], Any] | None = None,
    warp: str | None = None,
) -> PreparedBatch:
    """Read a batch and prepare it (`prepare`: the card's `input_preparer` unless given; `warp`:
    the settings' unless given)."""
    if card.context.native:
        inputs: list[Any] = read_native(scene, card, tiles)
    else:
        inputs = read_tiles(scene, card, tiles, halo, warp)
    return PreparedBatch((prepare or input_preparer(card))(inputs), [t.read_s for t in inputs])


@dataclass(frozen=True)
class Slot:
    """One batch's place in shared memory: a file of `size` bytes (size 0: none yet)."""

    index: int
    path: str
    size: int


@dataclass(frozen=True)
class InSlot:
    """A batch written into `slot`: its pickle without the arrays, and where each array lies."""

    slot: Slot
    payload: bytes
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class Inline:
    """A batch that came back through the pipe (no space for its slot)."""

    batch: Any
    #: what its slot would have needed
    nbytes: int


class ThreadReaders:
    """Reader threads in this process (`prepare`: the model's own input preparation)."""

    kind = "thread"

    def __init__(self, readers: int, prepare: Callable[[list[Any]], Any]):
        self.readers, self.prepare = readers, prepare
        self.pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="tilefm-read")

    def submit(self, scene: Scene, card: ModelCard, tiles: list[Tile], halo: int, warp: str) -> Future[Any]:
        if self.pool is None:
            raise RuntimeError("self.pool is not set")
        return self.pool.submit(read_prepared, scene, card, tiles, halo, self.prepare, warp)

    @contextlib.contextmanager
    def claim(self, fut: Future[Any]) -> Iterator[Any]:
        yield fut.result()

    def stop(self, pending: list[Future[Any]]) -> None:
        """End the map: cancel what has not started and wait for the rest (the threads go)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def close(self) -> None:
        self.stop([])


class ProcessReaders:
    """Reader processes (spawned once, kept across runs) writing prepared batches into shared
    memory slots; `slots` bounds the batches in flight (read, waiting, or being run)."""

    kind = "process"

    def __init__(self, readers: int, slots: int):
        self.readers = readers
        self.prefix = str(shm_dir() / f"tilefm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.free: list[Slot] = [Slot(i, "", 0) for i in range(slots)]
        self.held: dict[Future[Any], Slot] = {}
        self.maps: dict[int, tuple[str, mmap.mmap]] = {}
        self.warned = False
        self.pool = ProcessPoolExecutor(
            max_workers=readers, mp_context=get_context("spawn"), initializer=_init_reader
        )
        # spawned now (imports take seconds) while the model warms up: each submit
        # starts one, and none is started later
        with _main_not_rerun():
            for _ in range(readers):
                self.pool.submit(_ready)
        self._cleanup = weakref.finalize(self, _remove_files, self.prefix)

    def start(self) -> None:
        pass

    def submit(self, scene: Scene, card: ModelCard, tiles: list[Tile], halo: int, warp: str) -> Future[Any]:
        slot = self.free.pop()
        fut = self.pool.submit(
            _read_into, scene, card, tiles, halo, warp, slot, f"{self.prefix}-{slot.index}"
        )
        self.held[fut] = slot
        return fut

    @contextlib.contextmanager
    def claim(self, fut: Future[Any]) -> Iterator[Any]:
        """The batch `fut` read, as views of its slot while the `with` lasts; the slot is free
        again after it (nothing the model returns may refer to its input)."""
        slot = self.held.pop(fut)
        try:
            res = fut.result()
        except BaseException:
            self.free.append(slot)
            raise
        if isinstance(res, Inline):
            self.free.append(slot)
            if not self.warned:
                self.warned = True
                log.warning(
                    "no room for a %.0f MB batch in %s: reader processes send batches through a pipe "
                    "(slower; give the host or container more shared memory, e.g. docker's --shm-size)",
                    res.nbytes / 1e6,
                    os.path.dirname(self.prefix),
                )
            yield res.batch
            return
        try:
            self._adopt(res.slot)
            memory = memoryview(self.maps[slot.index][1])
            yield pickle.loads(  # noqa: S301 - from this process's own readers, never from outside
                res.payload, buffers=[memory[o : o + n] for o, n in res.spans]
            )
        finally:
            self.free.append(res.slot)

    def _adopt(self, slot: Slot) -> None:
        """Map a slot's file here; a file a reader replaced is deleted (mappings of it stay
        valid until dropped)."""
        replaced = _map_slot(self.maps, slot)[1]
        if replaced:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(replaced)

    def stop(self, pending: list[Future[Any]]) -> None:
        """End the map: a batch a reader still writes keeps its slot until the write is over."""
        for fut in pending:
            slot = self.held.pop(fut, None)
            if slot is None:
                continue
            if not fut.cancel():
                try:
                    res = fut.result()
                except BaseException:  # noqa: BLE001 - the map is over; its error was raised or is moot
                    res = None
                if isinstance(res, InSlot):
                    self._adopt(res.slot)
                    slot = res.slot
            self.free.append(slot)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.maps.clear()
        self._cleanup()


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Spawned processes run the parent's main script again before their first task (a script
    without an `if __name__ == "__main__"` guard would start its whole run in every reader); the
    readers need only tilefm's modules, so they are started without knowing that script."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None  # multiprocessing reads the name of `python -m`'s module from here
    try:
        yield
    finally:
        if "__spec__" not in saved:
            del main.__spec__
        main.__dict__.update(saved)


def _map_slot(maps: dict[int, tuple[str, mmap.mmap]], slot: Slot) -> tuple[mmap.mmap, str | None]:
    """A slot's file mapped once per file, in this process's `maps` (by slot index); the path
    of the file it replaces there, if any."""
    had = maps.get(slot.index)
    if had is not None and had[0] == slot.path:
        return had[1], None
    with open(slot.path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), slot.size)
    maps[slot.index] = (slot.path, mm)
    return mm, had[0] if had is not None else None


def _remove_files(prefix: str) -> None:
    folder, stem = os.path.split(prefix)
    for name in os.listdir(folder):
        if name.startswith(stem + "-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


# --- in the reader processes -------------------------------------------------------------------

#: this process's mappings of slot files, by slot index: (path, mapping)
_maps: dict[int, tuple[str, mmap.mmap]] = {}
_preparers: dict[str, Any] = {}


def _init_reader() -> None:
    """One core each: the readers are as many as the cores they should use. Freed arrays stay
    in the heap for the next tile (`tilefm.engine.memory`)."""
    import torch

    from tilefm.engine.memory import retain_freed_memory

    torch.set_num_threads(1)
    retain_freed_memory()


def _ready() -> int:
    import tilefm.io.read  # noqa: F401 - imported ahead of the first batch

    return os.getpid()


def _read_into(
    scene: Scene, card: ModelCard, tiles: list[Tile], halo: int, warp: str, slot: Slot, stem: str
) -> InSlot | Inline:
    """Read and prepare a batch, then write its arrays into `slot` (replaced by a larger file
    under `stem` when it is too small)."""
    prepare = _preparers.get(card.name)
    if prepare is None or prepare.card != card:
        prepare = _preparers[card.name] = input_preparer(card)
    batch = read_prepared(scene, card, tiles, halo, prepare, warp)
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    spans, end = [], 0
    for r in raws:
        spans.append((end, r.nbytes))
        end = -(-(end + r.nbytes) // ALIGN) * ALIGN
    if end > slot.size:
        size = int(end * HEADROOM)
        path = f"{stem}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return Inline(batch, end)
        try:
            # reserves the pages now: a full tmpfs fails here, not with SIGBUS at the first write
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            return Inline(batch, end)
        os.close(fd)
        slot = Slot(slot.index, path, size)
    mm = _map_slot(_maps, slot)[0]
    for (off, n), r in zip(spans, raws, strict=True):
        mm[off : off + n] = r
    return InSlot(slot, payload, spans)
