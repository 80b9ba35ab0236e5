"""Stitching: tile outputs into one EPSG:3857 mosaic, then a web-optimized COG.

Tile outputs arrive in any order. A tile of the mosaic is final once every planned tile whose
halo reaches it has contributed; it is then quantized and written, and its accumulator dropped,
so memory follows the tiles in flight, not the scene.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window
from rio_cogeo import cog_validate

from tilefm import __version__, libc
from tilefm.card import ModelCard
from tilefm.engine.cog import COGBuilder, encode_block, template_fields
from tilefm.grid import TILE_SIZE, Tile, TilePlan
from tilefm.values import CLASS_NODATA, INT8_NODATA, Encoding, TileOutput

if TYPE_CHECKING:
    from tilefm.storage import EarlyParts

#: finished tiles waiting for the writer thread before `add` waits too
WRITES_AHEAD = 2
#: per-patch children handed to a mosaic thread at once (a GPU batch's worth): their encoding
#: and overview sums are then a few torch operations for all of them. Up to WRITES_AHEAD groups
#: per thread wait (vit-base: 25 MB of outputs a group)
CHILDREN_PER_TASK = 32


class _Buffers:
    """Arrays handed from the stitcher to the writer thread and back: a fresh 200 MB parent tile
    costs ~250 ms of page faults, a reused one a refill (~7 ms)."""

    def __init__(self, keep: int):
        self.keep = keep
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, a: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault((a.shape, a.dtype.name), [])
            if len(free) < self.keep:
                free.append(a)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@dataclass
class _Acc:
    values: np.ndarray
    weight: np.ndarray
    remaining: int


@dataclass
class _Block:
    """A block of the mosaic filled piece by piece (a parent tile by its children, a block of
    an overview level by the tiles below it). What no piece covered is set to nodata once the
    block is complete: filling every block with nodata ahead took ~40% of the stitching
    thread's time for a 768-band output."""

    values: np.ndarray  # [C, 256, 256]
    remaining: int
    filled: np.ndarray  # [256 / piece, 256 / piece] bool: the pieces given
    #: pieces given but not yet written (a parent's children, written on the mosaic's threads)
    unwritten: int = 0

    def piece(self, row: int, col: int, n: int) -> np.ndarray:
        """The n x n piece at (row, col) of the block, to be written by the caller."""
        self.filled[row // n, col // n] = True
        self.remaining -= 1
        return self.values[:, row : row + n, col : col + n]

    def complete(self, nodata: float) -> np.ndarray:
        if not self.filled.all():
            n = TILE_SIZE // len(self.filled)
            self.values.transpose(1, 2, 0)[~self.filled.repeat(n, 0).repeat(n, 1)] = nodata
        return self.values


@dataclass
class MosaicWriter:
    """Accumulates tile outputs and writes finished tiles into a tiled GeoTIFF on local disk."""

    plan: TilePlan
    card: ModelCard
    path: Path
    encoding: Encoding
    halo: int
    tags: dict[str, str] = field(default_factory=dict)
    #: the mosaic's plan when it is coarser than the tiles' (per-patch outputs: `plan.coarsen(4)`,
    #: each output tile filled by its planned children's 16 x 16 outputs); None: `plan`
    out_plan: TilePlan | None = None
    #: threads that compress the streamed COG's blocks (0: up to 4, one per core)
    threads: int = 0
    #: False: a mosaic that GDAL's COG driver copies (`write_cog`) even where the COG could be
    #: streamed; None: streamed where it can be (float32 / int8 embeddings, overviews from a tile)
    stream: bool | None = None
    #: where the COG will be (`finish`'s `dst`): a streamed COG's full-resolution blocks are
    #: written there as they come (`COGBuilder.base`); None: beside `path`, moved at the end
    cog_path: Path | None = None
    #: where a streamed COG's full-resolution bytes go as they are final (`COGBuilder.early`)
    early: EarlyParts | None = None

    def __post_init__(self) -> None:
        #: `out_plan` resolved: the plan of the mosaic written
        self.target_plan: TilePlan = self.out_plan or self.plan
        self.out_plan = self.target_plan
        self.k = self.plan.zoom - self.target_plan.zoom
        if not 0 <= self.k <= 8 or (self.k and self.halo):
            raise ValueError(
                f"an output {self.k} zooms above the tiles must be 0..8 zooms up, without a halo"
            )
        self.planned = set(self.target_plan.tiles)
        self.written: set[Tile] = set()
        if self.k:
            self.expected: dict[Tile, int] = Counter(self._parent(t) for t in self.plan.tiles)
        else:
            self.expected = {t: self._expected(t) for t in self.plan.tiles}
        self.pending: dict[Tile, _Acc] = {}
        self.parents: dict[Tile, _Block] = {}  # per-patch outputs: parent tiles being filled
        #: per-patch children given but not yet handed to a mosaic thread
        self._children: list[tuple[Tile, _Block, np.ndarray, TileOutput]] = []
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []
        self.threads = self.threads or min(4, os.cpu_count() or 1)
        # tiles being written or waiting to be, plus those being filled (a row of parents)
        self._buffers = _Buffers(keep=WRITES_AHEAD * self.threads + 4)
        self._half: dict[tuple[int, ...], np.ndarray] = {}
        self.channels = self.card.output.channels
        levels = self.target_plan.overview_levels
        # embeddings (float or int8): every level made here from each tile as it is final, and
        # the COG streamed (cog.py); each tile's output must cover a pixel of the coarsest level
        self.streamed = (
            self.stream is not False
            and self.encoding.dtype in ("float32", "int8")
            and levels <= (TILE_SIZE >> self.k).bit_length() - 1
        )
        #: finished blocks of the streamed COG are float16 where it stores 16 bits (what the
        #: block encoder takes as it is; half the bytes of float32 through every step)
        self._block_dtype = "float16" if self.streamed and self.encoding.nbits == 16 else self.encoding.dtype
        self._levels_lock = threading.Lock()
        self._parents_lock = threading.Lock()
        if self.streamed:
            int8 = self.encoding.dtype == "int8"
            fields = template_fields(
                self._profile(),
                self.tags,
                self.band_descriptions(),
                (self.encoding.scale, self.encoding.offset) if int8 else None,
            )
            bits = 8 if int8 else self.encoding.nbits or 32
            self._level_blocks: list[dict[tuple[int, int], _Block]] = [{} for _ in range(levels + 1)]
            self._level_expected = [
                Counter(self._block_of(self._origin(t), i) for t in self.plan.tiles)
                for i in range(levels + 1)
            ]
            self.cog = COGBuilder(
                Path(f"{self.path}.blocks"),
                self.target_plan.width,
                self.target_plan.height,
                self.channels,
                levels,
                bits,
                fields,
                base=self.cog_path,
                expected=set(self._level_expected[0]),
                early=self.early,
            )
            return
        # the mosaic keeps float16 outputs' (rounded) values as float32, and `write_cog` stores 16
        # bits: GDAL >= 3.11 reads a 16-bit float file as Float16, from which its COG driver
        # cannot make overviews ("all the overviews bands must have the same data type")
        profile = self._profile()
        profile.pop("nbits", None)
        self.dataset = rasterio.open(self.path, "w", **profile)
        self.dataset.update_tags(**self.tags)
        for i, name in enumerate(self.band_descriptions(), start=1):
            self.dataset.set_band_description(i, name)
        if self.encoding.dtype == "int8":
            self.dataset.scales = [self.encoding.scale] * self.channels
            self.dataset.offsets = [self.encoding.offset] * self.channels
        if self.card.output.kind == "classes":
            self.dataset.write_colormap(1, self.colormap())

    def _profile(self) -> dict[str, Any]:
        enc = self.encoding
        profile = dict(
            driver="GTiff",
            width=self.target_plan.width,
            height=self.target_plan.height,
            count=self.channels,
            dtype=enc.dtype,
            nodata=enc.nodata,
            crs="EPSG:3857",
            transform=self.target_plan.transform,
            tiled=True,
            blockxsize=TILE_SIZE,
            blockysize=TILE_SIZE,
            compress="ZSTD",
            zstd_level=1,
            interleave="pixel",
            sparse_ok=True,
            bigtiff="IF_SAFER",
        )
        if enc.nbits:
            profile["nbits"] = enc.nbits
        if self.k:
            # per-patch outputs (hundreds of bands, 1/256 of the pixels): a band-interleaved,
            # uncompressed scratch file takes a parent tile in a quarter of the time, so the
            # writer keeps up with a GPU; the COG step compresses and interleaves (threaded)
            profile.update(interleave="band", compress=None, sparse_ok=True)
            profile.pop("zstd_level", None)
            profile.pop("nbits", None)
        return profile

    def band_descriptions(self) -> list[str]:
        if self.card.output.kind == "classes":
            return ["class"]
        return [f"{self.card.output.kind}_{i:03d}" for i in range(self.channels)]

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        cmap = {}
        for c in self.card.output.classes:
            h = c.color.lstrip("#")
            cmap[c.value] = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255)
        return cmap

    def _neighbours(self, tile: Tile) -> list[Tile]:
        if self.halo == 0:
            return [tile]
        reach = math.ceil(self.halo / TILE_SIZE)
        return [
            Tile(tile.x + dx, tile.y + dy, tile.z)
            for dy in range(-reach, reach + 1)
            for dx in range(-reach, reach + 1)
        ]

    def _expected(self, tile: Tile) -> int:
        return sum(1 for n in self._neighbours(tile) if n in self.planned)

    def _parent(self, tile: Tile) -> Tile:
        return Tile(tile.x >> self.k, tile.y >> self.k, tile.z - self.k)

    def _origin(self, tile: Tile) -> tuple[int, int]:
        """Pixel (row, col) in the mosaic where a planned tile's output goes."""
        t, n = self._parent(tile), TILE_SIZE >> self.k
        row, col = self.target_plan.offset(t)
        return row + (tile.y - (t.y << self.k)) * n, col + (tile.x - (t.x << self.k)) * n

    @staticmethod
    def _block_of(origin: tuple[int, int], level: int) -> tuple[int, int]:
        """The (x, y) block of an overview level that holds a pixel of the mosaic."""
        return (origin[1] >> level) // TILE_SIZE, (origin[0] >> level) // TILE_SIZE

    def _acc(self, tile: Tile, channels: int) -> _Acc:
        """The accumulator of an output tile, made on its first contribution."""
        acc = self.pending.get(tile)
        if acc is None:
            acc = self.pending[tile] = _Acc(
                np.zeros((channels, TILE_SIZE, TILE_SIZE), np.float32),
                np.zeros((TILE_SIZE, TILE_SIZE), np.float32),
                self.expected[tile],
            )
        return acc

    def _new_block(self, dtype: str) -> np.ndarray:
        """A block of the mosaic, [C, 256, 256]: for the streamed COG, a view of pixel-interleaved
        memory, which is how the file stores it (the encoder then takes it without a transpose,
        and Presto's pixel-interleaved outputs are copied in without one)."""
        if self.streamed:
            return self._buffers.take((TILE_SIZE, TILE_SIZE, self.channels), dtype).transpose(2, 0, 1)
        return self._buffers.take((self.channels, TILE_SIZE, TILE_SIZE), dtype)

    def _give(self, block: np.ndarray) -> None:
        self._buffers.give(block.transpose(1, 2, 0) if self.streamed else block)

    def _block(self, dtype: str, expected: int, piece: int) -> _Block:
        return _Block(self._new_block(dtype), expected, np.zeros((TILE_SIZE // piece,) * 2, bool))

    def _add_child(self, out: TileOutput) -> None:
        """A per-patch output: final on arrival (children do not overlap), so it is encoded
        straight into its block of the parent tile, which is written once complete. Blocks of
        children that never come (outside the plan) keep the nodata value."""
        t, n = self._parent(out.tile), TILE_SIZE >> self.k
        if out.values.shape[1:] != (n, n):
            raise ValueError(f"tile {out.tile}: expected a {n} x {n} output, got {out.values.shape[1:]}")
        parent = self.parents.get(t)
        if parent is None:
            parent = self.parents[t] = self._block(self._block_dtype, self.expected[t], n)
        row, col = (out.tile.y - (t.y << self.k)) * n, (out.tile.x - (t.x << self.k)) * n
        if not self.streamed:
            self._encode_into(out.values, out.weight, parent.piece(row, col, n))
            if parent.remaining == 0:
                self._submit(t, self.parents.pop(t).complete(self.encoding.nodata))
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
            self._flush_children()

    def _flush_children(self) -> None:
        if self._children:
            group, self._children = self._children, []
            self._queue(self.threads, self._finish_children, group)

    def _finish_children(self, group: list[tuple[Tile, _Block, np.ndarray, TileOutput]]) -> None:
        """Per-patch children of the streamed COG (on a mosaic thread): each encoded into its
        piece of the parent, their share of each overview level, the level blocks they complete
        compressed, and each parent once its last child is written. Children whose patches all
        had data (nearly all) are encoded and summed together, a few torch operations for the
        group; one child at a time took ~40 small ones each, and every one of them released the
        GIL and waited to take it back, behind the reader threads and the other mosaic threads
        (on a 16-core GPU host the stitching thread then waited for them most of the stream)."""
        dtype = group[0][3].values.dtype
        whole: list[tuple[Tile, _Block, np.ndarray, TileOutput]] = []
        done: list[tuple[int, tuple[int, int], np.ndarray]] = []
        for c in group:
            _t, _parent, block, out = c
            if out.values.dtype == dtype and bool((out.weight == 1).all()):
                whole.append(c)
            else:  # nodata patches: on its own, masked
                self._encode_into(out.values, out.weight, block)
                done += self._reduce(block, self._origin(out.tile), out.weight > 0)
        if whole:
            done += self._reduce_children(whole)
        for level, key, data in done:
            self._compress_now(level, key, data)
        finished: list[tuple[Tile, _Block]] = []
        with self._parents_lock:
            for t, parent, _block, _out in group:
                parent.unwritten -= 1
                if parent.remaining == 0 and parent.unwritten == 0:
                    finished.append((t, parent))
        for t, parent in finished:
            self.written.add(t)  # complete; `close` raises if its work failed
            row, col = self.target_plan.offset(t)
            self._compress_now(0, (col // TILE_SIZE, row // TILE_SIZE), parent.complete(self.encoding.nodata))

    def _reduce_children(
        self, whole: list[tuple[Tile, _Block, np.ndarray, TileOutput]]
    ) -> list[tuple[int, tuple[int, int], np.ndarray]]:
        """Children without nodata, encoded into their pieces of the parents together, and
        their share of each overview level; returns the level blocks completed."""
        import torch

        C, n = self.channels, TILE_SIZE >> self.k
        stored = torch.empty((len(whole), n, n, C), dtype=_torch_dtype(self._block_dtype))
        for i, (*_, out) in enumerate(whole):  # one pass each (a stacked copy first took 2.3x as long)
            v = torch.from_numpy(out.values)
            if v.is_contiguous():  # as a 2-D transpose: 1.8x faster than the 3-D permute
                self.encoding.encode_valid(v.view(C, n * n).t(), stored[i].view(n * n, C))
            else:
                self.encoding.encode_valid(v.permute(1, 2, 0), stored[i])
        pieces = stored.numpy()
        for i, (_t, _parent, block, _out) in enumerate(whole):
            block.transpose(1, 2, 0)[...] = pieces[i]  # numpy: a 16 x 16 copy keeps the GIL, as it should
        return self._place_levels(stored, None, [self._origin(out.tile) for *_, out in whole])

    def add(self, out: TileOutput) -> None:
        """Add one tile's output (and its halo's share to the neighbours); write what is complete."""
        if self.k:
            return self._add_child(out)
        h = out.halo
        ox, oy = out.tile.x * TILE_SIZE - h, out.tile.y * TILE_SIZE - h  # global pixel origin
        n = out.weight.shape[0]
        for t in self._neighbours(out.tile):
            if t not in self.planned:
                continue
            tx, ty = t.x * TILE_SIZE, t.y * TILE_SIZE
            x0, x1 = max(ox, tx), min(ox + n, tx + TILE_SIZE)
            y0, y1 = max(oy, ty), min(oy + n, ty + TILE_SIZE)
            if x0 >= x1 or y0 >= y1:
                continue
            acc = self._acc(t, out.values.shape[0])
            src = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
            dst = (slice(y0 - ty, y1 - ty), slice(x0 - tx, x1 - tx))
            if acc.remaining == self.expected[t] and h == 0:
                acc.values = out.values  # sole contribution: no copy
                acc.weight = out.weight
            else:
                acc.values[(slice(None), *dst)] += out.values[(slice(None), *src)]
                acc.weight[dst] += out.weight[src]
            acc.remaining -= 1
            if acc.remaining == 0:
                self._write(t, self.pending.pop(t))

    def _encode_into(self, values: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        """Blended values as stored, into `out`: classes by argmax, the rest by the encoding."""
        if self.card.output.kind == "classes":
            out[0] = np.argmax(values, axis=0)
            out[:, weight <= 0] = CLASS_NODATA
            return
        half = self._half.get(values.shape)
        if half is None and self.encoding.nbits == 16 and out.dtype != np.float16:
            half = self._half[values.shape] = np.empty(values.shape, np.float16)
        self.encoding.encode_into(values, weight, out, half)

    def _write(self, tile: Tile, acc: _Acc) -> None:
        if self.streamed:  # all of a full-resolution tile's work, on the mosaic's threads
            self.written.add(tile)  # complete; `close` raises if its work failed
            return self._queue(self.threads, self._finish_tile, tile, acc)
        data = self._buffers.take((self.channels, TILE_SIZE, TILE_SIZE), self.encoding.dtype)
        self._encode_into(acc.values, acc.weight, data)
        self._submit(tile, data)

    def _finish_tile(self, tile: Tile, acc: _Acc) -> None:
        """A final full-resolution tile of the streamed COG (on a mosaic thread): its block
        stored, its share of every overview level, and the blocks it completes compressed.
        Off the stitching thread, which otherwise spent ~50 ms of a 128-band tile here while
        the GPU's next batch waited for it."""
        data = self._new_block(self._block_dtype)
        self.encoding.encode_into(acc.values, acc.weight, data)
        row, col = self.target_plan.offset(tile)
        done = self._reduce(data, self._origin(tile), acc.weight > 0)
        self._compress_now(0, (col // TILE_SIZE, row // TILE_SIZE), data)
        for level, key, block in done:
            self._compress_now(level, key, block)

    def _reduce(
        self, block: np.ndarray, origin: tuple[int, int], valid: np.ndarray
    ) -> list[tuple[int, tuple[int, int], np.ndarray]]:
        """A final tile's (or child's) share of each overview level: the mean of the stored
        values below each pixel, nodata (pixels no tile covered: `valid` false) left out,
        rounded as the base is (int8: to the nearest quantized value, halves away from zero).
        Sums and counts are halved level by level, so every level is the mean over the base;
        GDAL's AVERAGE gives the same at the first level, and below averages the level above
        (means of means), which over-weights the pixels of a block that was partly nodata.
        Returns the level blocks this completed (every planned tile below them has given its
        share), to be compressed. Thread-safe."""
        import torch

        # pixels-last [H, W, C] (the streamed blocks' memory order): each sum of a 2 x 2 window
        # adds runs of C contiguous values; avg_pool2d over these strides was ~15x slower
        t = torch.from_numpy(block).permute(1, 2, 0)
        if bool(valid.all()):  # the count of a level is then 4^level everywhere
            return self._place_levels(t[None], None, [origin])
        mask = torch.from_numpy(np.ascontiguousarray(valid))[:, :, None]
        return self._place_levels(torch.where(mask, t, 0.0)[None], mask.to(torch.float32)[None], [origin])

    def _place_levels(
        self, total: Any, count: Any, origins: list[tuple[int, int]]
    ) -> list[tuple[int, tuple[int, int], np.ndarray]]:
        """Each overview level's means of [m, H, W, C] stored pixels (`count`: how many of the
        pixels below had data, [m, H, W, 1]; None: all of them), put where the m pieces at
        `origins` (their rows and columns in the mosaic) go; returns the level blocks completed."""
        import torch

        out = _torch_dtype(self._block_dtype)
        done: list[tuple[int, tuple[int, int], _Block]] = []
        for level in range(1, len(self._level_blocks)):
            total = _sum_2x2(total)
            if count is None:
                mean = total / float(4**level)
            else:
                count = _sum_2x2(count)
                mean = total / count  # 0 / 0: NaN, the nodata value
            if self.encoding.nbits == 16:
                mean = mean.to(torch.float16)
            elif (
                out == torch.int8
            ):  # quantized values: their mean rounded half away from zero, as GDAL's AVERAGE
                mean = torch.nan_to_num(torch.sign(mean) * torch.floor(mean.abs() + 0.5), nan=INT8_NODATA)
            means = mean.to(out).numpy()
            n = means.shape[1]
            with self._levels_lock:  # numpy copies: each a few kB, quicker with the GIL kept
                for (row, col), piece in zip(origins, means, strict=True):
                    key = self._block_of((row, col), level)
                    block = self._level_blocks[level].get(key)
                    if block is None:
                        block = self._level_blocks[level][key] = self._block(
                            self._block_dtype, self._level_expected[level][key], n
                        )
                    block.piece((row >> level) % TILE_SIZE, (col >> level) % TILE_SIZE, n).transpose(1, 2, 0)[
                        ...
                    ] = piece
                    if block.remaining == 0:
                        done.append((level, key, self._level_blocks[level].pop(key)))
        return [(level, key, b.complete(self.encoding.nodata)) for level, key, b in done]

    def _submit(self, tile: Tile, data: np.ndarray) -> None:
        """A finished tile, to be written without holding up the caller: compressed into the
        streamed COG on its threads, or written into the scratch mosaic on the mosaic's
        thread (GDAL compresses without the GIL)."""
        self.written.add(tile)  # complete; `close` raises if its write failed
        row, col = self.target_plan.offset(tile)
        if self.streamed:
            return self._compress(0, (col // TILE_SIZE, row // TILE_SIZE), data)
        self._queue(1, self._write_now, data, Window(col, row, TILE_SIZE, TILE_SIZE))

    def _compress(self, level: int, key: tuple[int, int], data: np.ndarray) -> None:
        self._queue(self.threads, self._compress_now, level, key, data)

    def _queue(self, workers: int, fn: Any, *args: Any) -> None:
        """Run `fn` on the writer's threads; at most WRITES_AHEAD per thread wait, which bounds
        the memory."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="tilefm-mosaic", initializer=_serial_torch
            )
        if len(self._writes) >= WRITES_AHEAD * workers:
            # whichever finishes first: the oldest may be the last child of a parent tile, whose
            # compression (a 768-band parent: ~0.3 s) the stitching thread waited for while the
            # other threads ran dry (most of the stream on a 16-core GPU host)
            done, pending = wait(self._writes, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
            self._writes = list(pending)
        self._writes.append(self._writer.submit(fn, *args))

    def _compress_now(self, level: int, key: tuple[int, int], data: np.ndarray) -> None:
        self.cog.put(level, *key, encode_block(data, self.cog.bits))
        self._give(data)

    def _write_now(self, data: np.ndarray, window: Window) -> None:
        self.dataset.write(data, window=window)
        self._buffers.give(data)

    @property
    def missing(self) -> list[Tile]:
        return [t for t in self.target_plan.tiles if t not in self.written]

    def close(self) -> None:
        """Wait for the writes (raising the first that failed), then close the file."""
        try:
            if self.streamed:
                self._flush_children()
            while self._writes:
                self._writes.pop(0).result()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._buffers.clear()  # not held through the COG step
            self._half.clear()
            if self.streamed:
                self._level_blocks = [{} for _ in self._level_blocks]
                self.cog.close()
            elif not self.dataset.closed:
                self.dataset.close()

    @property
    def front(self) -> int | None:
        """The streamed COG's bytes before its full resolution's, once finished (None: not streamed)."""
        return self.cog.front if self.streamed else None

    def finish(self, dst: Path) -> None:
        """The COG of a closed, complete mosaic at `dst`, validated: laid out from the blocks
        compressed during the stream, or (class maps) copied by GDAL's COG driver."""
        if self.missing:
            raise RuntimeError(f"the mosaic at {self.path} is not complete")
        if self.streamed:
            built = self.cog.finish()
            if built != dst:
                shutil.move(built, dst)
            validate_cog(dst)
        else:
            write_cog(self.path, dst, self.target_plan, self.encoding)


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


def _torch_dtype(name: str) -> Any:
    """A stored dtype's torch dtype (float16, float32, int8)."""
    import torch

    return getattr(torch, name)


def _sum_2x2(x: Any) -> Any:
    """Sums of 2 x 2 windows of an [..., H, W, C] tensor, in float32 (float16 values are taken
    as they are added: no float32 copy of the whole block)."""
    import torch

    total = x[..., 0::2, 0::2, :].to(torch.float32, copy=True)
    total += x[..., 0::2, 1::2, :]
    total += x[..., 1::2, 0::2, :]
    total += x[..., 1::2, 1::2, :]
    return total


def validate_cog(path: Path) -> None:
    valid, errors, _warnings = cog_validate(str(path), quiet=True)
    if not valid:
        raise RuntimeError(f"the COG written to {path} is not valid: {errors}")


def write_cog(mosaic: Path, dst: Path, plan: TilePlan, encoding: Encoding) -> None:
    """Copy the mosaic into a COG: 256-px internal tiles on the tile grid, overviews, compression.

    GDAL's COG driver copies the mosaic block by block (it is already on the grid: nothing to
    warp), keeping the tags, band descriptions, nodata, scales and colour map the MosaicWriter
    gave it; on a 384-band
    output it takes a third of the time of rio-cogeo's path through a warped VRT. For class maps
    (and mosaics too large for the stitcher's overviews); embeddings are streamed (`MosaicWriter.finish`)."""
    predictor = {1: "NO", 2: "STANDARD", 3: "FLOATING_POINT"}[encoding.predictor]
    options: dict[str, Any] = dict(
        COMPRESS="DEFLATE",
        PREDICTOR=predictor,
        BLOCKSIZE=TILE_SIZE,
        BIGTIFF="IF_SAFER",
        NUM_THREADS="ALL_CPUS",
        OVERVIEW_RESAMPLING=encoding.resampling.upper(),
        INTERLEAVE="PIXEL",
    )
    if plan.overview_levels:
        options["OVERVIEW_COUNT"] = plan.overview_levels
    else:
        options["OVERVIEWS"] = "NONE"
    if encoding.nbits:
        options["NBITS"] = encoding.nbits
    with rasterio.Env(GDAL_TIFF_OVR_BLOCKSIZE=str(TILE_SIZE)):
        rio_copy(str(mosaic), str(dst), driver="COG", **options)
    validate_cog(dst)


def output_tags(
    card: ModelCard,
    plan: TilePlan,
    scene: dict[str, Any],
    encoding: Encoding,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    tags = {
        "TILEFM_VERSION": __version__,
        "TILEFM_MODEL": card.name,
        "TILEFM_MODEL_VERSION": card.version,
        "TILEFM_MODEL_SHA256": card.weights.sha256,
        "TILEFM_CARD": card.model_dump_json(),
        "TILEFM_SCENE": json.dumps(scene, sort_keys=True),
        "TILEFM_ZOOM": str(plan.zoom),
        "TILEFM_OUTPUT_KIND": card.output.kind,
        "TILEFM_CREATED": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if encoding.dtype == "int8":
        tags["TILEFM_SCALE"] = repr(encoding.scale)
        tags["TILEFM_OFFSET"] = repr(encoding.offset)
    for k, v in (extra or {}).items():
        tags[f"TILEFM_{k.upper()}"] = v if isinstance(v, str) else json.dumps(v)
    return tags
