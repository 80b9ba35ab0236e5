"""Tile reads resampled by tilefm: every band on one source grid sampled at once, from source
windows decoded once per row of tiles.

Why not GDAL's warper for everything: driven per band and per read (rio-tiler's `part`), it spends
~35 ms on one band of a 4-tile strip, most of it in its approximate transformer at tilefm's
0.001-px tolerance, so a 10-band tile cost ~66 ms and one core read ~14 tiles/s: far too few to
keep a GPU busy. Here the exact transform runs on a lattice every 16 destination pixels, anchored
to the zoom's global pixel grid (a pixel's value does not depend on the strip it is read in),
halved until interpolating the lattice is within `tolerance` source pixels; then one bilinear
sampling call (torch's `grid_sample`, which releases the GIL) serves all bands of that grid.

Scope: only what GDAL computes with its 4-sample kernels, so that both give the same values (within
GDAL's own ~1 DN approximation error, tested): bilinear and nearest when a destination pixel spans
at most one source pixel (no kernel widening, no overviews), rasters with an affine geotransform.
Everything else (downsampling, cubic, average, GCP-georeferenced rasters) stays with GDAL.
Semantics are GDAL's: source pixel centres at +0.5, a destination pixel is valid when the source
pixel under its centre lies inside the raster and the valid neighbours carry weight (their weights
renormalised). Values stay floats, the interpolation itself: GDAL rounds them only when it writes
into an integer source's type, and tilefm asks it for float32 on its path too (`read.read_band`),
since whole-DN rounding is up to half a DN of noise that a scaled source (Landsat's 0.275 card
units per DN) would not share with the native one.

Why one module (~400 lines): the lattice, its error bound and the kernels are one algorithm whose
parts are checked against GDAL together (tests/test_warp.py).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.io import DatasetReader
from rasterio.windows import Window

from tilefm.grid import TILE_SIZE, tile_span

#: resampling methods this module reproduces; others go through GDAL
METHODS = ("nearest", "bilinear")
#: destination pixels per lattice step to start with (halved until accurate)
LATTICE = 16
#: a destination pixel may span this many source pixels and still use 4-sample kernels; above
#: it GDAL widens its kernel (and may read overviews), so tilefm hands the read to GDAL
MAX_FOOTPRINT = 1.0
#: GDAL's bilinear kernel: below this weight of valid neighbours the pixel has no value
MIN_WEIGHT = 1e-6


@dataclass(frozen=True)
class SourceGrid:
    """A raster's pixel grid: bands on the same grid share coordinates and one sampling call."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @classmethod
    def of(cls, ds: DatasetReader) -> SourceGrid | None:
        """None for a raster without a CRS or an affine geotransform (GCPs, RPCs): GDAL reads it."""
        if ds.crs is None or ds.transform == Affine.identity():
            return None
        return cls(ds.crs, ds.transform, ds.width, ds.height)


class _Transformers(threading.local):
    """pyproj transformers from web-mercator, one per target CRS and thread."""

    def __init__(self) -> None:
        self.by_crs: dict[str, Transformer] = {}

    def get(self, wkt: str) -> Transformer:
        t = self.by_crs.get(wkt)
        if t is None:
            t = self.by_crs[wkt] = Transformer.from_crs("EPSG:3857", wkt, always_xy=True)
        return t


_transformers = _Transformers()


class _Projected(threading.local):
    """Lattice points projected from web-mercator, per thread, for the strip being read: the
    grids of one CRS (Sentinel-2's 10 m and 20 m bands) differ only by their affine transform,
    so they share the projection, the costliest part of a lattice."""

    #: entries kept (a strip's lattices, their refinements and error probes take a few dozen)
    SIZE = 64

    def __init__(self) -> None:
        self.points: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, wkt: str, zoom: int, gc: np.ndarray, gr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Easting and northing, in the CRS `wkt`, of the centres of global pixels `gc`, `gr` (a
        regular grid of them: its shape and corners name it)."""
        key = (wkt, zoom, gc.shape, gc.flat[0], gr.flat[0], gc.flat[-1], gr.flat[-1])
        hit = self.points.get(key)
        if hit is None:
            if len(self.points) >= self.SIZE:
                self.points.clear()
            ox, oy, span = tile_span(zoom)
            res = span / TILE_SIZE
            e, n = _transformers.get(wkt).transform(ox + (gc + 0.5) * res, oy - (gr + 0.5) * res)
            hit = self.points[key] = (np.asarray(e, np.float64), np.asarray(n, np.float64))
        return hit


_projected = _Projected()


@dataclass(frozen=True)
class Strip:
    """A destination window on the zoom's global pixel grid: `width` x `height` pixels whose
    top-left pixel is global column `col0`, row `row0` (a row of tiles plus a halo)."""

    zoom: int
    col0: int
    row0: int
    width: int
    height: int

    @classmethod
    def of_row(cls, x: int, y: int, zoom: int, count: int, halo: int) -> Strip:
        return cls(
            zoom,
            x * TILE_SIZE - halo,
            y * TILE_SIZE - halo,
            count * TILE_SIZE + 2 * halo,
            TILE_SIZE + 2 * halo,
        )


class GridSampler:
    """Where a strip's pixel centres fall in one source grid, and sampling of bands there."""

    def __init__(self, grid: SourceGrid, strip: Strip, tolerance: float = 1e-3):
        self.grid, self.strip = grid, strip
        self.lattice = _Lattice.build(grid, strip, tolerance)

    def footprint(self) -> float:
        """The most source pixels one destination pixel spans along either of its axes."""
        return self.lattice.footprint

    def supports(self, method: str) -> bool:
        return method in METHODS and self.lattice.footprint <= MAX_FOOTPRINT

    def coords(self, cs: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Source (column, row) of the centres of the strip's columns `cs`, float64 [H, W]."""
        cols, rows, (oc, orow) = self.lattice.interpolate(cs, np.float64)
        return cols + oc, rows + orow

    def sample(
        self,
        bands: list[tuple[DatasetReader, int]],
        method: str,
        chunks: list[slice],
        into: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> Iterator[tuple[np.ndarray | Sequence[np.ndarray], np.ndarray]]:
        """`bands` (dataset, 1-based index) on this grid, resampled onto each chunk of the
        strip's columns (a tile and its halo): (values float32 [bands, H, chunk width], valid
        bool, the same shape), invalid pixels 0. The source window is read once for all chunks.
        `into`: per chunk, where each band's values go (float32 [H, chunk width] arrays, e.g.
        the rows of the caller's batch): the values are copied there and those are yielded."""
        g, lat, n = self.grid, self.lattice, len(bands)
        h = self.strip.height
        src = mask = None
        c0 = r0 = 0
        if lat.cmax >= 0 and lat.cmin < g.width and lat.rmax >= 0 and lat.rmin < g.height:
            # the lattice's hull holds every interpolated centre: its box bounds the window
            c0, r0 = math.floor(lat.cmin - 0.5) - 1, math.floor(lat.rmin - 0.5) - 1
            c1, r1 = math.floor(lat.cmax - 0.5) + 3, math.floor(lat.rmax - 0.5) + 3
            src, mask = _read_window(bands, Window(c0, r0, c1 - c0, r1 - r0), (c0, r0), g)
        for ci, cs in enumerate(chunks):
            width = len(range(*cs.indices(self.strip.width)))
            if src is None or mask is None:
                if into is None:
                    yield np.zeros((n, h, width), np.float32), np.zeros((n, h, width), bool)
                else:
                    for d in into[ci]:
                        d.fill(0.0)
                    yield into[ci], np.zeros((n, h, width), bool)
                continue
            # float32 coordinates relative to the chunk's own corner: ~1e-5 px, however large the strip
            cols, rows, (oc, orow) = lat.interpolate(cs, np.float32)
            sample = _nearest if method == "nearest" else _bilinear
            v, ok = sample(src, mask, cols, rows, (oc - c0, orow - r0))
            cmin, cmax, rmin, rmax = cols.min() + oc, cols.max() + oc, rows.min() + orow, rows.max() + orow
            if not (cmin >= 0 and cmax < g.width and rmin >= 0 and rmax < g.height):
                ok &= (cols >= -oc) & (cols < g.width - oc) & (rows >= -orow) & (rows < g.height - orow)
                v *= ok
            if into is None:
                yield v, ok
            else:
                for k in range(n):
                    np.copyto(into[ci][k], v[k])
                yield into[ci], ok


@dataclass
class _Lattice:
    """Exact source coordinates every `step` destination pixels (on the zoom's global pixel
    grid, so a pixel's coordinates do not depend on the strip), with their extent."""

    #: source column / row at the lattice points, float64 [rows, columns]
    c: np.ndarray
    r: np.ndarray
    step: int
    #: global destination column / row of the first lattice point
    lc0: int
    lr0: int
    strip: Strip
    footprint: float

    @property
    def cmin(self) -> float:
        return float(self.c.min())

    @property
    def cmax(self) -> float:
        return float(self.c.max())

    @property
    def rmin(self) -> float:
        return float(self.r.min())

    @property
    def rmax(self) -> float:
        return float(self.r.max())

    @classmethod
    def build(cls, grid: SourceGrid, strip: Strip, tolerance: float) -> _Lattice:
        """Halve the step from `LATTICE` until the midpoints of each cell's edges and its centre
        interpolate to within `tolerance` source pixels of their exact positions (GDAL's
        approximate transformer does the same along lines)."""
        inv, wkt = ~grid.transform, grid.crs.to_wkt()

        def exact(gc: np.ndarray, gr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            e, n = _projected.get(wkt, strip.zoom, gc, gr)
            return inv.a * e + inv.b * n + inv.c, inv.d * e + inv.e * n + inv.f

        last_c, last_r = strip.col0 + strip.width - 1, strip.row0 + strip.height - 1
        step = LATTICE
        while True:
            lc0, lr0 = (strip.col0 // step) * step, (strip.row0 // step) * step
            lc = lc0 + step * np.arange(-(-(last_c - lc0) // step) + 1, dtype=np.float64)
            lr = lr0 + step * np.arange(-(-(last_r - lr0) // step) + 1, dtype=np.float64)
            gc, gr = np.meshgrid(lc, lr)
            c, r = exact(gc, gr)
            if step == 1 or len(lc) < 2 or len(lr) < 2:
                break
            if not (_lattice_error(exact, gc, gr, c, r, step) > tolerance):  # NaN refines too
                break
            step //= 2
        if len(lc) > 1 and len(lr) > 1:
            dx = np.hypot(np.diff(c, axis=1), np.diff(r, axis=1)).max()
            dy = np.hypot(np.diff(c, axis=0), np.diff(r, axis=0)).max()
            footprint = float(max(dx, dy)) / step
        else:  # a strip inside one lattice cell: one pixel's neighbours
            c1, r1 = exact(np.array(lc[0] + 1), np.array(lr[0]))
            c2, r2 = exact(np.array(lc[0]), np.array(lr[0] + 1))
            footprint = max(math.hypot(c1 - c[0, 0], r1 - r[0, 0]), math.hypot(c2 - c[0, 0], r2 - r[0, 0]))
        return cls(c, r, step, lc0, lr0, strip, footprint)

    def interpolate(self, cs: slice, dtype: type) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Coordinates of the centres of the strip's columns `cs` (all rows), relative to an
        integer origin near them: (cols, rows [H, W] in `dtype`, origin (column, row))."""
        s = self.strip
        px = np.arange(s.col0, s.col0 + s.width)[cs] - self.lc0
        py = np.arange(s.row0, s.row0 + s.height) - self.lr0
        kx, fx = px // self.step, (px % self.step) / self.step
        ky = py // self.step
        fy: np.ndarray = ((py % self.step) / self.step).astype(dtype)[:, None]
        kx1 = np.minimum(kx + 1, self.c.shape[1] - 1)
        ky1 = np.minimum(ky + 1, self.c.shape[0] - 1)
        out = []
        for p in (self.c, self.r):
            along = p[:, kx] * (1 - fx) + p[:, kx1] * fx  # [lattice rows, W], float64
            origin = math.floor(float(along.min()))
            along = (along - origin).astype(dtype)
            full = along[ky] * (1 - fy)
            full += along[ky1] * fy
            out.append((full, origin))
        (cols, oc), (rows, orow) = out
        return cols, rows, (oc, orow)


def _lattice_error(
    exact: Callable, gc: np.ndarray, gr: np.ndarray, c: np.ndarray, r: np.ndarray, step: int
) -> float:
    """The largest distance, in source pixels, between exact and interpolated positions at the
    lattice's edge midpoints and cell centres. Both are needed: for a conformal map (web-mercator
    to UTM or to a polar stereographic grid) the curvatures along x and y cancel at a centre."""
    half = step / 2
    err = 0.0
    for (dc, dr), interp in (
        ((half, 0.0), lambda p: (p[:, :-1] + p[:, 1:]) / 2),
        ((0.0, half), lambda p: (p[:-1] + p[1:]) / 2),
        ((half, half), lambda p: (p[:-1, :-1] + p[1:, :-1] + p[:-1, 1:] + p[1:, 1:]) / 4),
    ):
        ic, ir = interp(c), interp(r)
        sel = (slice(0, ic.shape[0]), slice(0, ic.shape[1]))
        mc, mr = exact(gc[sel] + dc, gr[sel] + dr)
        d = np.abs(np.stack([mc - ic, mr - ir]))
        if not np.isfinite(d).all():  # outside the projection's domain somewhere: refine
            return math.inf
        err = max(err, float(d.max()))
    return err


def _read_window(
    bands: list[tuple[DatasetReader, int]], win: Window, origin: tuple[int, int], grid: SourceGrid
) -> tuple[np.ndarray, np.ndarray]:
    """The bands' decoded values (in their own type: a strip of a 10 m band is large) and
    validity over `win`; the parts of the window outside the raster are invalid."""
    n = len(bands)
    h, w = int(win.height), int(win.width)
    src = np.zeros((n, h, w), np.result_type(*(ds.dtypes[i - 1] for ds, i in bands)))
    mask = np.zeros((n, h, w), bool)
    c0, r0 = origin
    cc0, rr0 = max(c0, 0), max(r0, 0)
    cc1, rr1 = min(c0 + w, grid.width), min(r0 + h, grid.height)
    if cc1 <= cc0 or rr1 <= rr0:
        return src, mask
    part = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
    dst = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
    for k, (ds, index) in enumerate(bands):
        src[k][dst] = ds.read(index, window=part)
        mask[k][dst] = ds.read_masks(index, window=part) > 0
    return src, mask


def _bilinear(
    src: np.ndarray, mask: np.ndarray, cols: np.ndarray, rows: np.ndarray, origin: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's 4-sample bilinear with invalid neighbours dropped and the rest renormalised.
    `cols` / `rows` are relative to `origin`, a pixel corner of `src`'s window."""
    import torch
    import torch.nn.functional as F

    n = src.shape[0]
    oc, orow = origin
    # the part of the window this chunk's kernels touch
    c0 = max(oc + math.floor(float(cols.min()) - 0.5), 0)
    r0 = max(orow + math.floor(float(rows.min()) - 0.5), 0)
    c1 = min(oc + math.floor(float(cols.max()) - 0.5) + 2, src.shape[2])
    r1 = min(orow + math.floor(float(rows.max()) - 0.5) + 2, src.shape[1])
    sub, msub = src[:, r0:r1, c0:c1], mask[:, r0:r1, c0:c1]
    if msub.all():
        channels, dens = sub.astype(np.float32), 0
    else:  # invalid values (any number, NaN too) weigh nothing; their weights are tracked apart
        values = np.where(msub, sub, 0).astype(np.float32)
        shared = all(np.array_equal(msub[0], msub[k]) for k in range(1, n))
        dens = 1 if shared else n
        channels = np.concatenate([values, msub[:dens].astype(np.float32)])
    hs, ws = sub.shape[1:]
    grid = np.empty((1, *cols.shape, 2), np.float32)
    # align_corners=False: normalised -1 / +1 are the window's outer pixel edges
    np.multiply(cols + np.float32(oc - c0), np.float32(2 / ws), out=grid[0, ..., 0])
    np.multiply(rows + np.float32(orow - r0), np.float32(2 / hs), out=grid[0, ..., 1])
    grid -= 1
    x, g = torch.from_numpy(channels)[None], torch.from_numpy(grid)
    out = F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=False)[0].numpy()
    if not dens:
        return out, np.ones(out.shape, bool)
    num, den = out[:n], out[n:]
    # GDAL gives a pixel a value only where the source pixel under its centre has one (nearest
    # on the validity channels; a centre exactly on a pixel edge may go either way, as in GDAL)
    under = F.grid_sample(x[:, n:], g, mode="nearest", padding_mode="zeros", align_corners=False)[0].numpy()
    ok = (under > 0.5) & (den > MIN_WEIGHT)
    num /= np.where(ok, den, 1)
    num *= ok
    return num, np.broadcast_to(ok, num.shape).copy() if dens == 1 else ok


def _nearest(
    src: np.ndarray, mask: np.ndarray, cols: np.ndarray, rows: np.ndarray, origin: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The source pixel under each centre."""
    r, c = _under(mask.shape[1:], cols, rows, origin)
    ok = mask[:, r, c]
    return np.where(ok, src[:, r, c], 0).astype(np.float32), ok


def _under(
    shape: tuple[int, ...], cols: np.ndarray, rows: np.ndarray, origin: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column, in the window, of the source pixel under each centre."""
    hs, ws = shape
    c = np.clip(np.floor(cols).astype(np.intp) + origin[0], 0, ws - 1)
    r = np.clip(np.floor(rows).astype(np.intp) + origin[1], 0, hs - 1)
    return r, c
