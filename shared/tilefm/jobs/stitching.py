"""A running job's stitching thread, fed by the scheduler's loop.

The loop hands over each batch of tile outputs as Ray returns it (`offer`); the thread consumes
them through a bounded queue, so that the stitching overlaps the encoding and memory follows
the tiles in flight. While the queue is full, the loop holds the job's batches (`held`) and sends
none of its tiles out. Only the loop's thread offers, closes and aborts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from tilefm.values import TileOutput

#: batches waiting for a job's stitcher; while its queue is full, no more of its batches go out
FEED_BATCHES = 4
#: how long stopping a job waits for its stitching thread to let go (it stops at its next tile)
STOP_S = 60.0


class Aborted(Exception):
    """The job stopped (cancelled, failed, lease lost, scheduler stopping): no output."""


class _Marker:
    """What ends the queue: `_END` (every tile is in) or `_ABORT` (nothing is put)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_END, _ABORT = _Marker("end"), _Marker("abort")


class JobStitcher:
    """Runs `work(outputs, stitcher)` on a thread of its own; `outputs` yields `first` (the
    tiles read back from checkpoints), then every tile offered, and ends once the stitcher is
    closed, or raises `Aborted` once it is aborted.

    Args:
        name: the thread's name.
        work: the stitching, returning True once its output is published.
        first: tile outputs that go in before any offered.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[Iterator[TileOutput], JobStitcher], bool],
        first: Callable[[threading.Event], Iterator[TileOutput]] | None = None,
    ):
        self._work = work
        self._first = first
        self._queue: queue.Queue[list[TileOutput] | _Marker] = queue.Queue(maxsize=FEED_BATCHES)
        #: what waits for room in the queue
        self.held: deque[list[TileOutput] | _Marker] = deque()
        #: every tile is on its way (`_END` held or queued)
        self.closed = False
        self.aborted = threading.Event()
        #: the time the thread spent waiting for tiles (the encoders' time, not the stitcher's)
        self.waited_s = 0.0
        #: the outcome: True once published, False if withdrawn (or aborted)
        self.done: Future[bool] = Future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> JobStitcher:
        self._thread.start()
        return self

    def offer(self, outputs: list[TileOutput]) -> None:
        """Hand a batch over: queued now, or held until there is room (never waited for)."""
        self.held.append(outputs)
        self.feed()

    def close(self) -> None:
        """No more tiles: the stitcher publishes once it has taken the ones held."""
        self.held.append(_END)
        self.closed = True
        self.feed()

    def feed(self) -> None:
        """Move held batches into the queue while it has room."""
        while self.held:
            try:
                self._queue.put_nowait(self.held[0])
            except queue.Full:
                return
            self.held.popleft()

    def abort(self) -> None:
        """Stop without output: the thread raises at its next tile (or says no at `proceed`).
        Only the loop's thread puts into the queue, so emptying it makes room for the marker."""
        self.aborted.set()
        self.held.clear()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_ABORT)

    def join(self, timeout: float = STOP_S) -> bool:
        """Wait for the thread to end; False if it is still running after `timeout` seconds."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def outputs(self) -> Iterator[TileOutput]:
        if self._first is not None:
            yield from self._first(self.aborted)
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.waited_s += time.perf_counter() - t0
            if item is _ABORT or self.aborted.is_set():
                raise Aborted
            if isinstance(item, _Marker):  # _END
                return
            yield from item

    def _run(self) -> None:
        if not self.done.set_running_or_notify_cancel():
            return
        try:
            self.done.set_result(self._work(self.outputs(), self))
        except BaseException as e:  # noqa: BLE001 - handed to the loop through the future
            self.done.set_exception(e)
