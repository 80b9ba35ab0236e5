"""Stitching: tile outputs into one EPSG:3857 mosaic, then a web-optimized COG.

Tile outputs arrive in any order. A tile of the mosaic is final once every planned tile whose
halo reaches it has contributed; it is then quantized and written, and its accumulator dropped,
so memory follows the tiles in flight, not the scene.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window
from rasterio.shutil import copy as rio_copy
from rio_cogeo import cog_validate

from tilefm import __version__
from tilefm.grid import TILE_SIZE, Tile, TilePlan
from tilefm.models.base import TileOutput
from tilefm.models.card import ModelCard

CLASS_NODATA = 255
#: finished tiles waiting for the writer thread before `add` waits too
WRITES_AHEAD = 2
INT8_NODATA = -128


@dataclass(frozen=True)
class Encoding:
    """How output values are stored: dtype, nodata, and the scale/offset that undo quantization."""

    dtype: str  # GDAL dtype of the file
    nodata: float
    scale: float = 1.0
    offset: float = 0.0
    nbits: int | None = None  # 16 for float16 stored in a Float32 GeoTIFF
    predictor: int = 1
    resampling: str = "nearest"  # for overviews

    @classmethod
    def for_card(cls, card: ModelCard, dtype: str | None = None) -> "Encoding":
        out = card.output
        dtype = dtype or out.dtype
        if out.kind == "classes":
            return cls("uint8", CLASS_NODATA, resampling="mode", predictor=2)
        if dtype == "float16":
            return cls("float32", float("nan"), nbits=16, predictor=3, resampling="average")
        if dtype == "float32":
            return cls("float32", float("nan"), predictor=3, resampling="average")
        if dtype == "int8":
            lo, hi = out.value_range or (-1.0, 1.0)
            scale = (hi - lo) / 254.0
            return cls("int8", INT8_NODATA, scale=scale, offset=(hi + lo) / 2.0, resampling="average")
        raise ValueError(f"dtype {dtype!r} is not supported for {out.kind} outputs")

    @property
    def step(self) -> float:
        """Largest rounding error of a stored value (per unit of value, for float16 relative)."""
        return self.scale / 2 if self.dtype == "int8" else 0.0

    def encode(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.dtype == "int8":
            q = np.clip(np.rint((values - self.offset) / self.scale), -127, 127).astype(np.int8)
            q[:, ~valid] = INT8_NODATA
            return q
        if self.nbits == 16:  # rounded here, so that GDAL's 16-bit store is exact
            out = values.astype(np.float16).astype(np.float32)
        else:
            out = values.astype(np.float32, copy=True)
        out[:, ~valid] = np.nan
        return out


@dataclass
class _Acc:
    values: np.ndarray
    weight: np.ndarray
    remaining: int


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

    def __post_init__(self) -> None:
        self.out_plan = self.out_plan or self.plan
        self.k = self.plan.zoom - self.out_plan.zoom
        if not 0 <= self.k <= 8 or (self.k and self.halo):
            raise ValueError(f"an output {self.k} zooms above the tiles must be 0..8 zooms up, without a halo")
        self.planned = set(self.out_plan.tiles)
        self.written: set[Tile] = set()
        if self.k:
            self.expected = Counter(self._parent(t) for t in self.plan.tiles)
        else:
            self.expected = {t: self._expected(t) for t in self.plan.tiles}
        self.pending: dict[Tile, _Acc] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []
        self.channels = self.card.output.channels
        self.dataset = rasterio.open(self.path, "w", **self._profile())
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
            driver="GTiff", width=self.out_plan.width, height=self.out_plan.height, count=self.channels,
            dtype=enc.dtype, nodata=enc.nodata, crs="EPSG:3857", transform=self.out_plan.transform,
            tiled=True, blockxsize=TILE_SIZE, blockysize=TILE_SIZE, compress="ZSTD", zstd_level=1,
            interleave="pixel", sparse_ok=True, bigtiff="IF_SAFER",
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

    def _acc(self, tile: Tile, channels: int) -> _Acc:
        """The accumulator of an output tile, made on its first contribution."""
        acc = self.pending.get(tile)
        if acc is None:
            acc = self.pending[tile] = _Acc(
                np.zeros((channels, TILE_SIZE, TILE_SIZE), np.float32), np.zeros((TILE_SIZE, TILE_SIZE), np.float32), self.expected[tile]
            )
        return acc

    def _add_child(self, out: TileOutput) -> None:
        """A per-patch output: final on arrival (children do not overlap), so it is encoded
        straight into its block of the parent tile, which is written once complete. Blocks of
        children that never come (outside the plan) keep the nodata value."""
        t, n = self._parent(out.tile), TILE_SIZE >> self.k
        if out.values.shape[1:] != (n, n):
            raise ValueError(f"tile {out.tile}: expected a {n} x {n} output, got {out.values.shape[1:]}")
        acc = self.pending.get(t)
        if acc is None:
            channels = 1 if self.card.output.kind == "classes" else out.values.shape[0]
            data = np.full((channels, TILE_SIZE, TILE_SIZE), self.encoding.nodata, self.encoding.dtype)
            acc = self.pending[t] = _Acc(data, np.zeros(0, np.float32), self.expected[t])
        oy, ox = (out.tile.y - (t.y << self.k)) * n, (out.tile.x - (t.x << self.k)) * n
        acc.values[:, oy : oy + n, ox : ox + n] = self._encoded(out.values, out.weight)
        acc.remaining -= 1
        if acc.remaining == 0:
            self._submit(t, self.pending.pop(t).values)

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

    def _encoded(self, values: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Blended values (weighted sums / weights) as stored: classes by argmax, the rest by
        the encoding; nodata where nothing contributed."""
        valid = weight > 0
        if self.card.output.kind == "classes":
            data = np.argmax(values, axis=0).astype(np.uint8)[None]
            data[:, ~valid] = CLASS_NODATA
            return data
        return self.encoding.encode(values / np.where(valid, weight, 1.0)[None], valid)

    def _write(self, tile: Tile, acc: _Acc) -> None:
        self._submit(tile, self._encoded(acc.values, acc.weight))

    def _submit(self, tile: Tile, data: np.ndarray) -> None:
        """Write a finished tile on the writer thread (GDAL compresses without the GIL, so the
        caller goes on stitching); at most WRITES_AHEAD wait, which bounds the memory."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilefm-mosaic")
        while len(self._writes) >= WRITES_AHEAD:
            self._writes.pop(0).result()
        self._writes.append(self._writer.submit(self._write_now, tile, data))
        self.written.add(tile)  # complete; `close` raises if its write failed

    def _write_now(self, tile: Tile, data: np.ndarray) -> None:
        row, col = self.out_plan.offset(tile)
        self.dataset.write(data, window=Window(col, row, TILE_SIZE, TILE_SIZE))

    @property
    def missing(self) -> list[Tile]:
        return [t for t in self.out_plan.tiles if t not in self.written]

    def close(self) -> None:
        """Wait for the writes (raising the first that failed), then close the file."""
        try:
            while self._writes:
                self._writes.pop(0).result()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if not self.dataset.closed:
                self.dataset.close()


def write_cog(mosaic: Path, dst: Path, plan: TilePlan, encoding: Encoding) -> None:
    """Copy the mosaic into a COG: 256-px internal tiles on the tile grid, overviews, compression.

    GDAL's COG driver copies the mosaic block by block (it is already on the grid: nothing to
    warp), keeping the tags, band descriptions, nodata, scales and colour map the MosaicWriter
    gave it; on a 384-band
    output it takes a third of the time of rio-cogeo's path through a warped VRT."""
    predictor = {1: "NO", 2: "STANDARD", 3: "FLOATING_POINT"}[encoding.predictor]
    options: dict[str, Any] = dict(
        COMPRESS="DEFLATE", PREDICTOR=predictor, BLOCKSIZE=TILE_SIZE, BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
        OVERVIEW_RESAMPLING=encoding.resampling.upper(), INTERLEAVE="PIXEL",
    )
    if plan.overview_levels:
        options["OVERVIEW_COUNT"] = plan.overview_levels
    else:
        options["OVERVIEWS"] = "NONE"
    if encoding.nbits:
        options["NBITS"] = encoding.nbits
    with rasterio.Env(GDAL_TIFF_OVR_BLOCKSIZE=str(TILE_SIZE)):
        rio_copy(str(mosaic), str(dst), driver="COG", **options)
    valid, errors, _warnings = cog_validate(str(dst), quiet=True)
    if not valid:
        raise RuntimeError(f"the COG written to {dst} is not valid: {errors}")


def output_tags(card: ModelCard, plan: TilePlan, scene: dict[str, Any], encoding: Encoding, extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {
        "TILEFM_VERSION": __version__,
        "TILEFM_MODEL": card.name,
        "TILEFM_MODEL_VERSION": card.version,
        "TILEFM_MODEL_SHA256": card.weights.sha256,
        "TILEFM_CARD": card.model_dump_json(),
        "TILEFM_SCENE": json.dumps(scene, sort_keys=True),
        "TILEFM_ZOOM": str(plan.zoom),
        "TILEFM_OUTPUT_KIND": card.output.kind,
        "TILEFM_CREATED": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if encoding.dtype == "int8":
        tags["TILEFM_SCALE"] = repr(encoding.scale)
        tags["TILEFM_OFFSET"] = repr(encoding.offset)
    for k, v in (extra or {}).items():
        tags[f"TILEFM_{k.upper()}"] = v if isinstance(v, str) else json.dumps(v)
    return tags
