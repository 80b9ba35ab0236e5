"""Stitching: tile outputs into one EPSG:3857 mosaic, then a web-optimized COG.

Tile outputs arrive in any order. A tile of the mosaic is final once every planned tile whose
halo reaches it has contributed; it is then quantized and written, and its accumulator dropped,
so memory follows the tiles in flight, not the scene.

`MosaicWriter` puts together the parts in `tilefm.engine.mosaic`: the halo blender
(`blend.HaloBlender`) or, for per-patch outputs, the patch assembler (`patches.PatchAssembler`);
the overview pyramid made while stitching (`pyramid.OverviewPyramid`); and the sink behind one
protocol (`sinks.MosaicSink`): the streamed COG, or a scratch mosaic GDAL's COG driver copies.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilefm import __version__
from tilefm.card import ModelCard
from tilefm.engine.mosaic.blend import Acc, HaloBlender
from tilefm.engine.mosaic.blocks import Buffers, MosaicGrid, Quantizer
from tilefm.engine.mosaic.patches import PatchAssembler
from tilefm.engine.mosaic.pyramid import OverviewPyramid
from tilefm.engine.mosaic.sinks import (
    GDALCOGSink,
    MosaicFile,
    MosaicSink,
    StreamedCOGSink,
    validate_cog,
    write_cog,
)
from tilefm.engine.mosaic.threads import WRITES_AHEAD, MosaicThreads
from tilefm.grid import TILE_SIZE, Tile, TilePlan
from tilefm.values import Encoding, TileOutput

if TYPE_CHECKING:
    from tilefm.storage import EarlyParts

__all__ = ["MosaicWriter", "output_tags", "validate_cog", "write_cog"]


@dataclass
class MosaicWriter:
    """Accumulates tile outputs and writes finished tiles into a tiled GeoTIFF on local disk: a
    facade over the parts in `tilefm.engine.mosaic` (halo blending or per-patch assembly, the
    overview pyramid, and the sink: the streamed COG or GDAL's COG driver)."""

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
        self.grid = MosaicGrid(self.plan, self.target_plan)
        self.k = self.grid.k
        if not 0 <= self.k <= 8 or (self.k and self.halo):
            raise ValueError(
                f"an output {self.k} zooms above the tiles must be 0..8 zooms up, without a halo"
            )
        self.written: set[Tile] = set()
        self.threads = self.threads or min(4, os.cpu_count() or 1)
        self.channels = self.card.output.channels
        levels = self.target_plan.overview_levels
        # embeddings (float or int8): every level made here from each tile as it is final, and
        # the COG streamed (cog.py); each tile's output must cover a pixel of the coarsest level
        self.streamed = (
            self.stream is not False
            and self.encoding.dtype in ("float32", "int8")
            and levels <= (TILE_SIZE >> self.k).bit_length() - 1
        )
        self.file = MosaicFile(self.path, self.target_plan, self.card, self.encoding, self.tags, self.k)
        # tiles being written or waiting to be, plus those being filled (a row of parents)
        buffers = Buffers(keep=WRITES_AHEAD * self.threads + 4)
        self._threads = MosaicThreads(self.threads if self.streamed else 1)
        self.quantizer = Quantizer(self.encoding, classes=self.card.output.kind == "classes")
        self.sink: MosaicSink
        pyramid: OverviewPyramid | None = None
        if self.streamed:
            expected = [self.grid.pieces(i) for i in range(levels + 1)]
            self.sink = StreamedCOGSink(
                self.file, buffers, self._threads, levels, set(expected[0]), self.cog_path, self.early
            )
            self.pyramid = pyramid = OverviewPyramid(self.grid, expected, self.encoding, self.sink)
        else:
            self.sink = GDALCOGSink(self.file, buffers, self._threads)
        if self.k:  # per-patch outputs
            self.expected: dict[Tile, int] = Counter(self.grid.parent(t) for t in self.plan.tiles)
            self.patches = PatchAssembler(
                self.grid, self.expected, self.quantizer, self.sink, self.written, self._threads, pyramid
            )
            self._add = self.patches.add
        else:
            self.blender = HaloBlender(self.plan.tiles, self.target_plan.tiles, self.halo, self._write)
            self.expected = self.blender.expected
            self._add = self.blender.add

    def band_descriptions(self) -> list[str]:
        return self.file.band_descriptions()

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        return self.file.colormap()

    def _parent(self, tile: Tile) -> Tile:
        return self.grid.parent(tile)

    @property
    def pending(self) -> dict[Tile, Acc]:
        """Full-resolution tiles of the mosaic given some of their contributions, not all."""
        return {} if self.k else self.blender.pending

    def add(self, out: TileOutput) -> None:
        """Add one tile's output (and its halo's share to the neighbours); write what is complete."""
        self._add(out)

    def _write(self, tile: Tile, acc: Acc) -> None:
        """A final full-resolution tile (`HaloBlender`'s `final`), to be written without holding
        up the caller: all its work on the mosaic's threads for the streamed COG; quantized
        here and written on the mosaic's thread for GDAL's (which compresses without the GIL)."""
        if self.streamed:  # all of a full-resolution tile's work, on the mosaic's threads
            self.written.add(tile)  # complete; `close` raises if its work failed
            return self._threads.queue(self._finish_tile, tile, acc)
        data = self.sink.new_block()
        self.quantizer.encode_into(acc.values, acc.weight, data)
        self.written.add(tile)  # complete; `close` raises if its write failed
        self.sink.put(tile, data)

    def _finish_tile(self, tile: Tile, acc: Acc) -> None:
        """A final full-resolution tile of the streamed COG (on a mosaic thread): its block
        stored, its share of every overview level, and the blocks it completes compressed.
        Off the stitching thread, which otherwise spent ~50 ms of a 128-band tile here while
        the GPU's next batch waited for it."""
        data = self.sink.new_block()
        self.encoding.encode_into(acc.values, acc.weight, data)
        key = self.grid.key(tile)
        done = self.pyramid.reduce(data, self.grid.origin(tile), acc.weight > 0)
        self.sink.write_now(0, key, data)
        for level, k, block in done:
            self.sink.write_now(level, k, block)

    @property
    def missing(self) -> list[Tile]:
        return [t for t in self.target_plan.tiles if t not in self.written]

    def close(self) -> None:
        """Wait for the writes (raising the first that failed), then close the file."""
        try:
            if self.k:
                self.patches.flush()
            self._threads.wait()
        finally:
            self._threads.shutdown()
            self.quantizer.clear()
            if self.streamed:
                self.pyramid.clear()
            self.sink.close()  # its buffers dropped: not held through the COG step

    @property
    def front(self) -> int | None:
        """The streamed COG's bytes before its full resolution's, once finished (None: not streamed)."""
        return self.sink.front

    def finish(self, dst: Path) -> None:
        """The COG of a closed, complete mosaic at `dst`, validated: laid out from the blocks
        compressed during the stream, or (class maps) copied by GDAL's COG driver."""
        if self.missing:
            raise RuntimeError(f"the mosaic at {self.path} is not complete")
        self.sink.finish(dst)


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
