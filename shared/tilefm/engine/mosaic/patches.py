"""Per-patch outputs (16 x 16 per tile at stride 16) assembled into the parent tiles of a mosaic
`k` zooms above the tiles: each child's output is final on arrival (children do not overlap)."""

from __future__ import annotations

import threading

import numpy as np

from tilefm.engine.mosaic.blocks import Block, MosaicGrid, Quantizer
from tilefm.engine.mosaic.pyramid import Done, OverviewPyramid, torch_dtype
from tilefm.engine.mosaic.sinks import MosaicSink
from tilefm.engine.mosaic.threads import MosaicThreads
from tilefm.grid import TILE_SIZE, Tile
from tilefm.values import TileOutput

#: per-patch children handed to a mosaic thread at once (a GPU batch's worth): their encoding
#: and overview sums are then a few torch operations for all of them. Up to WRITES_AHEAD groups
#: per thread wait (vit-base: 25 MB of outputs a group)
CHILDREN_PER_TASK = 32

#: a child given: its parent tile, the parent's block, its piece of the block, its output
_Child = tuple[Tile, Block, np.ndarray, TileOutput]


class PatchAssembler:
    """Puts per-patch children into their parent tiles, and hands each parent to the sink once
    every planned child is in.

    Args:
        grid: where each child goes (`grid.k` zooms below its parent).
        expected: the planned children of each parent tile.
        quantizer: how a child's values are stored.
        sink: where complete parents go: `put` (a scratch mosaic), or `write_now` on the mosaic's
            threads (the streamed COG); its `new_block`s are the parents.
        written: the parents complete, added to as each is handed to the sink.
        threads: the mosaic's threads.
        pyramid: the streamed COG's overview levels, to which each child gives its share on the
            mosaic's threads; None: not streamed (children encoded on the caller's thread).
    """

    def __init__(
        self,
        grid: MosaicGrid,
        expected: dict[Tile, int],
        quantizer: Quantizer,
        sink: MosaicSink,
        written: set[Tile],
        threads: MosaicThreads,
        pyramid: OverviewPyramid | None = None,
    ):
        self.grid = grid
        self.k = grid.k
        self.expected = expected
        self.quantizer = quantizer
        self.encoding = quantizer.encoding
        self.sink = sink
        self.written = written
        self._threads = threads
        self.streamed = pyramid is not None
        if pyramid is not None:
            self.pyramid = pyramid
        self.parents: dict[Tile, Block] = {}  # parent tiles being filled
        #: per-patch children given but not yet handed to a mosaic thread
        self._children: list[_Child] = []
        self._parents_lock = threading.Lock()

    def add(self, out: TileOutput) -> None:
        """A per-patch output: final on arrival (children do not overlap), so it is encoded
        straight into its block of the parent tile, which is written once complete. Blocks of
        children that never come (outside the plan) keep the nodata value."""
        t, n = self.grid.parent(out.tile), TILE_SIZE >> self.k
        if out.values.shape[1:] != (n, n):
            raise ValueError(f"tile {out.tile}: expected a {n} x {n} output, got {out.values.shape[1:]}")
        parent = self.parents.get(t)
        if parent is None:
            parent = self.parents[t] = Block.of(self.sink.new_block(), self.expected[t], n)
        row, col = (out.tile.y - (t.y << self.k)) * n, (out.tile.x - (t.x << self.k)) * n
        if not self.streamed:
            self.quantizer.encode_into(out.values, out.weight, parent.piece(row, col, n))
            if parent.remaining == 0:
                data = self.parents.pop(t).complete(self.encoding.nodata)
                self.written.add(t)  # complete; `close` raises if its write failed
                self.sink.put(t, data)
            return
        # given and counted as one step: a mosaic thread completes the parent only when every
        # child is both given and written
        with self._parents_lock:
            block = parent.piece(row, col, n)
            parent.unwritten += 1
        if parent.remaining == 0:
            del self.parents[t]
        self._children.append((t, parent, block, out))
        if len(self._children) >= CHILDREN_PER_TASK:
            self.flush()

    def flush(self) -> None:
        """Hand the children given to a mosaic thread."""
        if self._children:
            group, self._children = self._children, []
            self._threads.queue(self._finish_children, group)

    def _finish_children(self, group: list[_Child]) -> None:
        """Per-patch children of the streamed COG (on a mosaic thread): each encoded into its
        piece of the parent, their share of each overview level, the level blocks they complete
        compressed, and each parent once its last child is written. Children whose patches all
        had data (nearly all) are encoded and summed together, a few torch operations for the
        group; one child at a time took ~40 small ones each, and every one of them released the
        GIL and waited to take it back, behind the reader threads and the other mosaic threads
        (on a 16-core GPU host the stitching thread then waited for them most of the stream)."""
        dtype = group[0][3].values.dtype
        whole: list[_Child] = []
        done: Done = []
        for c in group:
            _t, _parent, block, out = c
            if out.values.dtype == dtype and bool((out.weight == 1).all()):
                whole.append(c)
            else:  # nodata patches: on its own, masked
                self.quantizer.encode_into(out.values, out.weight, block)
                done += self.pyramid.reduce(block, self.grid.origin(out.tile), out.weight > 0)
        if whole:
            done += self._reduce_children(whole)
        for level, key, data in done:
            self.sink.write_now(level, key, data)
        finished: list[tuple[Tile, Block]] = []
        with self._parents_lock:
            for t, parent, _block, _out in group:
                parent.unwritten -= 1
                if parent.remaining == 0 and parent.unwritten == 0:
                    finished.append((t, parent))
        for t, parent in finished:
            self.written.add(t)  # complete; `close` raises if its work failed
            self.sink.write_now(0, self.grid.key(t), parent.complete(self.encoding.nodata))

    def _reduce_children(self, whole: list[_Child]) -> Done:
        """Children without nodata, encoded into their pieces of the parents together, and
        their share of each overview level; returns the level blocks completed."""
        import torch

        C, n = self.sink.channels, TILE_SIZE >> self.k
        stored = torch.empty((len(whole), n, n, C), dtype=torch_dtype(self.sink.dtype))
        for i, (*_, out) in enumerate(whole):  # one pass each (a stacked copy first took 2.3x as long)
            v = torch.from_numpy(out.values)
            if v.is_contiguous():  # as a 2-D transpose: 1.8x faster than the 3-D permute
                self.encoding.encode_valid(v.view(C, n * n).t(), stored[i].view(n * n, C))
            else:
                self.encoding.encode_valid(v.permute(1, 2, 0), stored[i])
        pieces = stored.numpy()
        for i, (_t, _parent, block, _out) in enumerate(whole):
            block.transpose(1, 2, 0)[...] = pieces[i]  # numpy: a 16 x 16 copy keeps the GIL, as it should
        return self.pyramid.place(stored, None, [self.grid.origin(out.tile) for *_, out in whole])
