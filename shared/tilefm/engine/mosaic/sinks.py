"""Where the mosaic's finished blocks go, behind one protocol: the streamed COG (`COGBuilder`,
each block compressed on the mosaic's threads as it is final, every overview level made while
stitching), or a scratch GeoTIFF that GDAL's COG driver copies at the end (`write_cog`: class
maps, and mosaics too large for the stitcher's overviews)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import rasterio
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window
from rio_cogeo import cog_validate

from tilefm.card import ModelCard
from tilefm.engine.cog import COGBuilder, encode_block, template_fields
from tilefm.engine.mosaic.blocks import Buffers
from tilefm.engine.mosaic.threads import MosaicThreads
from tilefm.grid import TILE_SIZE, Tile, TilePlan
from tilefm.values import Encoding

if TYPE_CHECKING:
    from tilefm.storage import EarlyParts


@dataclass
class MosaicFile:
    """The mosaic's file: where it is, its grid, and its bands as GDAL describes them."""

    path: Path
    plan: TilePlan  # the mosaic's
    card: ModelCard
    encoding: Encoding
    tags: dict[str, str] = field(default_factory=dict)
    #: zooms the mosaic is above the tiles (per-patch outputs)
    k: int = 0

    @property
    def channels(self) -> int:
        return self.card.output.channels

    def profile(self) -> dict[str, Any]:
        enc = self.encoding
        profile = dict(
            driver="GTiff",
            width=self.plan.width,
            height=self.plan.height,
            count=self.channels,
            dtype=enc.dtype,
            nodata=enc.nodata,
            crs="EPSG:3857",
            transform=self.plan.transform,
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


class MosaicSink(Protocol):
    """Where the mosaic's finished blocks go, and how its COG is made of them."""

    #: the dtype of the blocks it takes (`new_block`)
    dtype: str
    #: the mosaic's bands
    channels: int

    def new_block(self) -> np.ndarray:
        """A [C, 256, 256] block of the mosaic, in the memory order the sink stores it; it is
        the sink's again once given to `put` or `write_now`."""
        ...

    def put(self, tile: Tile, data: np.ndarray) -> None:
        """A finished tile of the mosaic, written on the mosaic's threads."""
        ...

    def write_now(self, level: int, key: tuple[int, int], data: np.ndarray) -> None:
        """The (x, y) block `key` of a level (0: the full resolution), written now."""
        ...

    @property
    def front(self) -> int | None:
        """The COG's bytes before its full resolution's, once finished (None: not known)."""
        ...

    def close(self) -> None:
        """Close the file, once the mosaic's threads are done; its buffers are dropped."""
        ...

    def finish(self, dst: Path) -> None:
        """The COG of the closed, complete mosaic at `dst`, validated."""
        ...


class StreamedCOGSink:
    """The streamed COG: each block compressed on the mosaic's threads as it is final, its
    full-resolution blocks written into the COG's file as they come (`COGBuilder`).

    Args:
        file: the mosaic (its scratch blocks go to `{file.path}.blocks`).
        buffers: the blocks' reused memory.
        threads: the mosaic's threads.
        levels: overview levels below the full resolution.
        expected: the (x, y) blocks of the full resolution that will come.
        base: where the COG will be (`finish`'s `dst`); None: beside `file.path`, moved at the end.
        early: where the full resolution's bytes go as they are final (`COGBuilder.early`).
    """

    def __init__(
        self,
        file: MosaicFile,
        buffers: Buffers,
        threads: MosaicThreads,
        levels: int,
        expected: set[tuple[int, int]],
        base: Path | None = None,
        early: EarlyParts | None = None,
    ):
        self.plan = file.plan
        self.channels = file.channels
        self._buffers = buffers
        self._threads = threads
        enc = file.encoding
        #: finished blocks are float16 where it stores 16 bits (what the block encoder takes as it
        #: is; half the bytes of float32 through every step)
        self.dtype = "float16" if enc.nbits == 16 else enc.dtype
        int8 = enc.dtype == "int8"
        fields = template_fields(
            file.profile(), file.tags, file.band_descriptions(), (enc.scale, enc.offset) if int8 else None
        )
        bits = 8 if int8 else enc.nbits or 32
        self.cog = COGBuilder(
            Path(f"{file.path}.blocks"),
            file.plan.width,
            file.plan.height,
            self.channels,
            levels,
            bits,
            fields,
            base=base,
            expected=expected,
            early=early,
        )

    def new_block(self) -> np.ndarray:
        """A block of the mosaic, [C, 256, 256]: a view of pixel-interleaved memory, which is how
        the file stores it (the encoder then takes it without a transpose, and Presto's
        pixel-interleaved outputs are copied in without one)."""
        return self._buffers.take((TILE_SIZE, TILE_SIZE, self.channels), self.dtype).transpose(2, 0, 1)

    def put(self, tile: Tile, data: np.ndarray) -> None:
        row, col = self.plan.offset(tile)
        self._threads.queue(self.write_now, 0, (col // TILE_SIZE, row // TILE_SIZE), data)

    def write_now(self, level: int, key: tuple[int, int], data: np.ndarray) -> None:
        self.cog.put(level, *key, encode_block(data, self.cog.bits))
        self._buffers.give(data.transpose(1, 2, 0))

    @property
    def front(self) -> int | None:
        return self.cog.front

    def close(self) -> None:
        self._buffers.clear()  # not held through the COG step
        self.cog.close()

    def finish(self, dst: Path) -> None:
        built = self.cog.finish()
        if built != dst:
            shutil.move(built, dst)
        validate_cog(dst)


class GDALCOGSink:
    """A scratch GeoTIFF of the mosaic, each finished tile written on the mosaic's thread (GDAL
    compresses without the GIL), which GDAL's COG driver copies at the end (`write_cog`).

    Args:
        file: the mosaic.
        buffers: the tiles' reused memory.
        threads: the mosaic's thread.
    """

    def __init__(self, file: MosaicFile, buffers: Buffers, threads: MosaicThreads):
        self.file = file
        self.plan = file.plan
        self.channels = file.channels
        self.dtype = file.encoding.dtype
        self._buffers = buffers
        self._threads = threads
        # the mosaic keeps float16 outputs' (rounded) values as float32, and `write_cog` stores 16
        # bits: GDAL >= 3.11 reads a 16-bit float file as Float16, from which its COG driver
        # cannot make overviews ("all the overviews bands must have the same data type")
        profile = file.profile()
        profile.pop("nbits", None)
        self.dataset = rasterio.open(file.path, "w", **profile)
        self.dataset.update_tags(**file.tags)
        for i, name in enumerate(file.band_descriptions(), start=1):
            self.dataset.set_band_description(i, name)
        if file.encoding.dtype == "int8":
            self.dataset.scales = [file.encoding.scale] * self.channels
            self.dataset.offsets = [file.encoding.offset] * self.channels
        if file.card.output.kind == "classes":
            self.dataset.write_colormap(1, file.colormap())

    def new_block(self) -> np.ndarray:
        return self._buffers.take((self.channels, TILE_SIZE, TILE_SIZE), self.dtype)

    def put(self, tile: Tile, data: np.ndarray) -> None:
        row, col = self.plan.offset(tile)
        self._threads.queue(self.write_now, 0, (col // TILE_SIZE, row // TILE_SIZE), data)

    def write_now(self, level: int, key: tuple[int, int], data: np.ndarray) -> None:
        if level:
            raise ValueError("GDAL's COG driver makes the overviews of a scratch mosaic")
        self.dataset.write(data, window=Window(key[0] * TILE_SIZE, key[1] * TILE_SIZE, TILE_SIZE, TILE_SIZE))
        self._buffers.give(data)

    @property
    def front(self) -> int | None:
        return None

    def close(self) -> None:
        self._buffers.clear()  # not held through the COG step
        if not self.dataset.closed:
            self.dataset.close()

    def finish(self, dst: Path) -> None:
        write_cog(self.file.path, dst, self.file.plan, self.file.encoding)


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
