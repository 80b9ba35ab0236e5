"""The mosaic's threads: finished tiles written, compressed and reduced off the stitching thread."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from tilefm import libc

#: finished tiles waiting for the writer thread before `add` waits too
WRITES_AHEAD = 2


class MosaicThreads:
    """Runs the mosaic's work on its threads, started with the first; at most WRITES_AHEAD per
    thread wait, which bounds the memory.

    Args:
        workers: the threads.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []

    def queue(self, fn: Any, *args: Any) -> None:
        """Run `fn` on the writer's threads; at most WRITES_AHEAD per thread wait, which bounds
        the memory."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="tilefm-mosaic", initializer=_serial_torch
            )
        if len(self._writes) >= WRITES_AHEAD * self.workers:
            # whichever finishes first: the oldest may be the last child of a parent tile, whose
            # compression (a 768-band parent: ~0.3 s) the stitching thread waited for while the
            # other threads ran dry (most of the stream on a 16-core GPU host)
            done, pending = wait(self._writes, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
            self._writes = list(pending)
        self._writes.append(self._writer.submit(fn, *args))

    def wait(self) -> None:
        """Wait for the work queued, raising the first that failed."""
        while self._writes:
            self._writes.pop(0).result()

    def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None


def _serial_torch() -> None:
    """A mosaic thread's torch operations on its own core: the threads already run in
    parallel, and each one's operations would otherwise fan out to a team of OpenMP threads
    as large as the host (six teams of 16 on a 16-core GPU host, spinning between operations
    against the readers). OpenMP's thread count is the calling thread's own: the rest of the
    process keeps its teams. Torch sets a thread's count on its first parallel operation, so
    one runs first."""
    import torch

    torch.ones(1 << 16).sum()
    libc.omp_set_num_threads(1)  # False: no OpenMP in this torch's global namespace (macOS)
