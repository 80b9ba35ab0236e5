"""Inference on the scene's own pixel grid, for models with spatial context (`context.grid: native`).

A model that looks at its neighbourhood (a U-Net, a ViT) answers for the pixels it is shown. Shown
imagery resampled onto web-mercator tiles, it answers for smoothed texture it never saw in
training: bilinear upsampling makes a bright desert read as cloud to a cloud model. So these
models run on the grid the scene was recorded on (coarsened by a whole factor to the card's
`gsd_m` where the scene is much finer), and only their answer is put onto the tiles.

XYZ tiles stay the unit of work, of resume and of output. For each output tile:

1. `InferenceGrid` is the scene's finest grid among the model's bands (bands on coarser grids are
   repeated onto it by nearest neighbour, finer ones area-averaged: never interpolated).
2. `WindowLattice` lays the model's windows on that grid once for the whole scene, anchored at its
   pixel (0, 0). A tile reads the grid region spanned by every lattice window that touches the
   tile's footprint (plus a margin for the resampling below), so each grid pixel is blended from
   the same windows whichever tile computes it: neighbouring tiles agree exactly, and there is no
   tile seam to hide.
3. The model blends its windows' scores on that region (`NativeInput`, then the model's own
   blending), and `to_tile` resamples the blended sums onto the tile's pixels with GDAL's warper
   (bilinear, or area average where the tile's pixels are coarser), leaving decisions such as the
   argmax of classes to the stitcher, after resampling.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import morecantile
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds

from tilefm.card import Context, ModelCard
from tilefm.errors import SceneError
from tilefm.grid import TILE_SIZE, TMS, Tile
from tilefm.io.read import GDAL_ENV, _cache
from tilefm.io.scene import BandFile, Modality, Scene

#: grid pixels read beyond a tile's footprint, on top of the resampling kernel's reach: the
#: footprint is computed from the tile's corners in the grid's CRS, and a densified edge of a
#: reprojected tile bows by well under a pixel at these sizes
MARGIN_PX = 2
#: tiles per batch on the native grid: a batch's tiles share the windows where their regions
#: overlap, so larger batches run fewer windows a tile (at stride 64 and zoom 11: ~16 windows a
#: tile in batches of 16, against ~30 in batches of 4)
NATIVE_BATCH = 16


@dataclass(frozen=True)
class InferenceGrid:
    """The pixel grid a native-grid model runs on: a CRS, an affine transform and a size."""

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    #: whole source pixels per grid pixel (1 = the scene's own pixels)
    factor: int = 1

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def res(self) -> float:
        return abs(self.transform[0])

    def describe(self) -> str:
        """`EPSG:32629 100 m` (and `x3` when coarsened), for tags, items and logs."""
        crs = _crs(self.crs)
        epsg = crs.to_epsg()
        name = f"EPSG:{epsg}" if epsg else crs.to_string()
        res = f"{self.res:g} {'deg' if crs.is_geographic else 'm'}"
        return f"{name} {res}" + (f" (scene pixels x{self.factor})" if self.factor > 1 else "")

    @classmethod
    def of(cls, scene: Scene, card: ModelCard) -> InferenceGrid:
        """The finest grid among the card's bands in the scene, coarsened by the largest whole
        factor that keeps its pixels no larger than the card's `gsd_m`."""
        best = None
        for mod, band in _card_bands(scene, card):
            grid = _band_grid(mod, band.path)
            if best is None or grid[2] < best[2]:
                best = grid
        if best is None:
            raise SceneError(f"the scene has none of model {card.name!r}'s bands")
        crs, transform, res, width, height, metres = best
        factor = 1
        if card.gsd_m and metres:
            factor = max(1, int(card.gsd_m / metres + 1e-6))
        t = Affine(*transform)
        coarse = t @ Affine.scale(factor)
        return cls(crs, tuple(coarse)[:6], math.ceil(width / factor), math.ceil(height / factor), factor)

    def ground_resolution_m(self) -> float | None:
        crs = _crs(self.crs)
        if crs.is_geographic:
            return None
        return self.res * (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0)

    def pixel_span(self, tile: Tile, margin: int) -> tuple[int, int, int, int]:
        """Rows and columns [r0, r1) x [c0, c1) of this grid that cover the tile, plus `margin`."""
        b = TMS.xy_bounds(morecantile.Tile(tile.x, tile.y, tile.z))
        left, bottom, right, top = transform_bounds(
            "EPSG:3857", self.crs, b.left, b.bottom, b.right, b.top, densify_pts=21
        )
        inv = ~self.affine
        cols, rows = zip(*(inv @ (x, y) for x in (left, right) for y in (bottom, top)), strict=True)
        r0, r1 = math.floor(min(rows)) - margin, math.ceil(max(rows)) + margin
        c0, c1 = math.floor(min(cols)) - margin, math.ceil(max(cols)) + margin
        return r0, r1, c0, c1


@dataclass(frozen=True)
class WindowLattice:
    """The model's windows on an inference grid: `window` pixels at `stride`, window `i` along
    an axis covering grid pixels [i * stride - anchor, i * stride - anchor + window)."""

    window: int
    stride: int

    @classmethod
    def of(cls, ctx: Context) -> WindowLattice:
        return cls(ctx.window, ctx.stride)

    @property
    def anchor(self) -> int:
        # centres the windows' overlap on the grid's origin, so every pixel is covered the same
        # number of times, the grid's first rows and columns included
        return (self.window - self.stride) // 2

    def start(self, i: int) -> int:
        return i * self.stride - self.anchor

    def covering(self, p0: int, p1: int) -> range:
        """Indices of the windows that touch pixels [p0, p1) along one axis."""
        first = -(
            (self.window - 1 - p0 - self.anchor) // self.stride
        )  # ceil((p0 + anchor - window + 1) / stride)
        last = (p1 - 1 + self.anchor) // self.stride
        return range(first, last + 1)


@dataclass
class NativeInput:
    """A tile's input on the inference grid: the region spanned by the lattice windows that touch
    the tile, in the card's band order and units (offsets applied, not yet normalised)."""

    tile: Tile
    grid: InferenceGrid
    #: lattice indices of the region's first window (row, column) and the windows per axis
    first: tuple[int, int]
    count: tuple[int, int]
    #: [bands, H, W] float32 and [bands, H, W] bool (True where the band has a value)
    data: np.ndarray
    valid: np.ndarray
    band_names: list[str]
    lattice: WindowLattice
    date: datetime.date | None = None
    read_s: float = 0.0
    #: a native input's values reach the tile through `to_tile`, never through a halo
    halo: int = 0
    #: a tile pixel's size in grid pixels: above 1 `to_tile` area-averages (bilinear from a
    #: finer grid would sample, not summarise, the pixels in between), else it is bilinear
    tile_over_grid: float = 1.0

    @property
    def origin(self) -> tuple[int, int]:
        """Grid row and column of the region's top-left pixel."""
        return self.lattice.start(self.first[0]), self.lattice.start(self.first[1])

    @property
    def region_transform(self) -> Affine:
        r, c = self.origin
        return self.grid.affine @ Affine.translation(c, r)

    def windows(self) -> list[tuple[int, int]]:
        """Lattice indices of the region's windows, row by row."""
        (i0, j0), (ni, nj) = self.first, self.count
        return [(i, j) for i in range(i0, i0 + ni) for j in range(j0, j0 + nj)]

    def window_offset(self, i: int, j: int) -> tuple[int, int]:
        """Where window (i, j) starts inside this region."""
        s = self.lattice.stride
        return (i - self.first[0]) * s, (j - self.first[1]) * s


def read_native(scene: Scene, card: ModelCard, tiles: list[Tile]) -> list[NativeInput]:
    """Each tile's region of the inference grid, every band of the card on it."""
    t0 = time.perf_counter()
    grid = InferenceGrid.of(scene, card)
    lattice = WindowLattice.of(card.context)
    names = [f"{i.modality}:{b.name}" for i in card.inputs for b in i.bands]
    out = []
    for tile in tiles:
        # a tile pixel's size in grid pixels: the resampling kernel's reach beyond the tile's edge
        ratio = _tile_over_grid(grid, tile)
        margin = MARGIN_PX + math.ceil(max(1.0, ratio))
        r0, r1, c0, c1 = grid.pixel_span(tile, margin)
        rows, cols = lattice.covering(r0, r1), lattice.covering(c0, c1)
        first, count = (rows.start, cols.start), (len(rows), len(cols))
        h = (count[0] - 1) * lattice.stride + lattice.window
        w = (count[1] - 1) * lattice.stride + lattice.window
        top, left = lattice.start(first[0]), lattice.start(first[1])
        transform = grid.affine @ Affine.translation(left, top)
        data = np.zeros((len(names), h, w), np.float32)
        valid = np.zeros((len(names), h, w), bool)
        k = 0
        for inp in card.inputs:
            mod = scene.modalities.get(inp.modality)
            for b in inp.bands:
                band = mod.bands.get(b.name) if mod else None
                if band is not None:
                    _read_onto(band, grid, transform, data[k], valid[k])
                k += 1
        out.append(
            NativeInput(
                tile, grid, first, count, data, valid, names, lattice, scene.date, tile_over_grid=ratio
            )
        )
    share = (time.perf_counter() - t0) / max(len(tiles), 1)
    for o in out:
        o.read_s = share
    return out


def to_tile(inp: NativeInput, sums: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blended sums [C, H, W] and their weights [H, W] on the input's region, resampled onto the
    tile's pixels by GDAL's warper: ([C, 256, 256], [256, 256]) float32. Sums and weights are
    resampled alike, so their ratio is a normalised interpolation that ignores pixels without
    input."""
    b = TMS.xy_bounds(morecantile.Tile(inp.tile.x, inp.tile.y, inp.tile.z))
    res = (b.right - b.left) / TILE_SIZE
    dst_transform = Affine(res, 0, b.left, 0, -res, b.top)
    stack = np.concatenate([sums, weight[None]]).astype(np.float32, copy=False)
    dst = np.zeros((stack.shape[0], TILE_SIZE, TILE_SIZE), np.float32)
    reproject(
        stack,
        dst,
        src_transform=inp.region_transform,
        src_crs=inp.grid.crs,
        dst_transform=dst_transform,
        dst_crs="EPSG:3857",
        resampling=Resampling.average if inp.tile_over_grid > 1.0 else Resampling.bilinear,
        num_threads=1,
    )
    return dst[:-1], dst[-1]


def _tile_over_grid(grid: InferenceGrid, tile: Tile) -> float:
    """A tile pixel's size in grid pixels (at the tile's centre)."""
    r0, r1, c0, c1 = grid.pixel_span(tile, 0)
    return max(r1 - r0, c1 - c0) / TILE_SIZE


def _card_bands(scene: Scene, card: ModelCard) -> list[tuple[Modality, BandFile]]:
    found = []
    for inp in card.inputs:
        mod = scene.modalities.get(inp.modality)
        if mod is not None:
            found += [(mod, mod.bands[b.name]) for b in inp.bands if b.name in mod.bands]
    return found


def _band_grid(mod: Modality, path: str) -> tuple[str, tuple[float, ...], float, int, int, float | None]:
    """(CRS WKT, transform, pixel size, width, height, pixel size in metres or None) of a file,
    as the scene recorded it when it was opened (where it was read, with the right credentials)."""
    recorded = mod.grids.get(path)
    crs_wkt, transform, width, height = recorded if recorded is not None else _open_grid(path)
    crs = _crs(crs_wkt)
    res = abs(transform[0])
    metres = (
        None if crs.is_geographic else res * (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0)
    )
    return crs_wkt, transform, res, width, height, metres


def _open_grid(path: str) -> tuple[str, tuple[float, ...], int, int]:
    """A file's grid for scenes assembled by hand, without what `open_scene` records."""
    src = _cache.dataset(path)
    return src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height


@lru_cache(maxsize=64)
def _crs(wkt: str) -> CRS:
    return CRS.from_wkt(wkt)


def _read_onto(
    band: BandFile, grid: InferenceGrid, transform: Affine, values: np.ndarray, valid: np.ndarray
) -> None:
    """One band onto a region of the grid, in place: coarser files repeated by nearest
    neighbour, finer ones area-averaged (never interpolated); outside the file stays invalid."""
    src = _cache.dataset(band.path)
    finer = abs(src.transform.a) < grid.res * 0.999 and _crs(grid.crs) == src.crs
    resampling = Resampling.average if finer else Resampling.nearest
    nodata = src.nodata
    fill = np.float32(np.nan)
    with rasterio.Env(**GDAL_ENV):
        reproject(
            rasterio.band(src, band.index),
            values,
            src_transform=src.transform,
            src_crs=src.crs,
            src_nodata=nodata,
            dst_transform=transform,
            dst_crs=grid.crs,
            dst_nodata=fill,
            init_dest_nodata=True,
            resampling=resampling,
            num_threads=1,
        )
    np.isfinite(values, out=valid)
    values[~valid] = 0.0
    band.to_units(values)
    values[~valid] = 0.0
