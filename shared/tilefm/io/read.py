"""Tile reads: every band a model needs, resampled onto one XYZ tile (plus a halo).

Bands come from files of different resolutions and CRSs; each is resampled onto the same
WebMercatorQuad pixel grid, so the model sees one aligned stack. Nodata and masks travel with the
values as a per-band validity array; nothing is filled silently. A row of neighbouring tiles is
read as one strip: bands on one source grid are sampled together by `tilefm.io.warp` where it
computes what GDAL's warper does (bilinear / nearest, no downsampling), and by GDAL's warper
through rio-tiler elsewhere (`TILEFM_WARP=gdal` for every read).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import date

import morecantile
import numpy as np
import rasterio
from rasterio.io import DatasetReader
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader

from tilefm.card import ModelCard
from tilefm.errors import MissingBandError, SceneError
from tilefm.grid import TILE_SIZE, TMS, Tile
from tilefm.io.scene import BandFile, Scene
from tilefm.io.warp import GridSampler, SourceGrid, Strip
from tilefm.settings import get_settings

#: the warper's largest approximation error, in pixels. GDAL's default (0.125) makes a pixel's
#: value depend on the extent it is read with (up to ~60 DN here between a tile and the same tile
#: read with a halo); 0.001 brings that to <= 1 DN at no measurable cost.
WARP_TOLERANCE = 0.001
# GDAL settings for tile reads: no directory listing of sidecar files, modest block cache
#: per-read GDAL options. Not GDAL_CACHEMAX: rasterio.Env takes a number there as bytes and sets
#: the process-wide block cache (a `256` meant as MiB was a 256-byte cache, which made every
#: multi-band read re-decompress its blocks); the cache is the process's (env var, or 5% of RAM)
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.jp2,.vrt",
}


@dataclass
class TileInput:
    """A tile's input stack in the card's band order (modalities concatenated). For a time
    series (`dates` not empty), `data` and `valid` have a leading timestep axis."""

    tile: Tile
    halo: int
    #: [bands, H, W] float32 in the card's units (offsets applied, not yet normalised); a time
    #: series: [timesteps, bands, H, W]
    data: np.ndarray
    #: [bands, H, W] (a time series: [timesteps, bands, H, W]) True where the band has a value
    valid: np.ndarray
    band_names: list[str]
    #: acquisition date of the scene (models that use the season need it); a time series: its first
    date: date | None = None
    #: inputs read with their own extra halo ("modality:band" -> values, valid), e.g. a DEM for slopes
    extra: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    read_s: float = 0.0
    #: a time series: the date of each timestep, in order; empty for a scene of one date
    dates: list[datetime.date] = field(default_factory=list)  # `date` is the field above here
    #: "modality:band" -> the centre wavelength (um) the scene's sensor or item states for that
    #: band, where it does (a wavelength-conditioned encoder binds to the sensor's own bands)
    wavelengths: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.data.shape[-1]

    def lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        """Longitude and latitude of every pixel centre, [H, W] float64 each."""
        n = self.size
        lon = tile_longitudes(self.tile, n, self.halo)
        lat = tile_latitudes(self.tile, n, self.halo)
        return np.broadcast_to(lon[None, :], (n, n)), np.broadcast_to(lat[:, None], (n, n))


def _pixel_centres(tile: Tile, n: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    b = TMS.xy_bounds(morecantile.Tile(tile.x, tile.y, tile.z))
    res = (b.right - b.left) / TILE_SIZE
    offsets = (np.arange(n) - halo + 0.5) * res
    return b.left + offsets, b.top - offsets


def tile_longitudes(tile: Tile, n: int = TILE_SIZE, halo: int = 0) -> np.ndarray:
    """Longitudes of the pixel-centre columns of a tile read with `halo`, [n] degrees."""
    return np.degrees(_pixel_centres(tile, n, halo)[0] / 6378137.0)


def tile_latitudes(tile: Tile, n: int = TILE_SIZE, halo: int = 0) -> np.ndarray:
    """Latitudes of the pixel-centre rows (inverse web-mercator), [n] degrees."""
    ys = _pixel_centres(tile, n, halo)[1]
    return np.degrees(2 * np.arctan(np.exp(ys / 6378137.0)) - math.pi / 2)


def card_band_names(card: ModelCard) -> list[str]:
    return [f"{i.modality}:{b.name}" for i in card.inputs for b in i.bands]


def scene_bands(scene: Scene, card: ModelCard) -> dict[str, float | None]:
    """The card bands ("modality:band") the scene has a file for, each with the centre
    wavelength (um) its sensor or item states for that file (Landsat OLI's for its B8A read as a
    card's B08), None where it states none."""
    return {
        f"{i.modality}:{b.name}": f.wavelength_um
        for i in card.inputs
        if (mod := scene.modalities.get(i.modality)) is not None
        for b in i.bands
        if (f := mod.bands.get(b.name)) is not None
    }


def check_scene(scene: Scene, card: ModelCard) -> None:
    """Fail before planning if the scene cannot feed the model (every acquisition of a time
    series, and the series itself: `check_series`)."""
    for inp in card.inputs:
        mod = scene.modalities.get(inp.modality)
        if mod is None:
            if inp.required:
                raise SceneError(
                    f"model {card.name!r} needs a {inp.modality!r} modality "
                    f"(bands {', '.join(inp.band_names)}); pass --scene {inp.modality}=SOURCE",
                    field=f"scene.{inp.modality}",
                )
            continue
        for acq in scene.series.get(inp.modality, [mod]):
            missing = [b for b in inp.band_names if b not in acq.bands]
            if missing and (inp.required or len(missing) == len(inp.band_names)):
                raise MissingBandError(
                    f"band{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing from {acq.source!r} "
                    f"(model {card.name!r} needs {', '.join(inp.band_names)}; "
                    f"found {', '.join(sorted(acq.bands))})",
                    field=f"scene.{inp.modality}",
                )
    known = {i.modality for i in card.inputs}
    if not known & set(scene.modalities):
        raise SceneError(
            f"none of the scene's modalities ({', '.join(scene.modalities)}) is an input of model "
            f"{card.name!r} (inputs: {', '.join(sorted(known))})"
        )
    check_series(scene, card)


def check_series(scene: Scene, card: ModelCard) -> None:
    """A time series only for a model that takes one (`max_timesteps` in its card), of no more
    dates than it takes, and only of modalities it reads. The error names the modality with the
    most acquisitions."""
    if not scene.series:
        return
    name = max(scene.series, key=lambda k: len(scene.series[k]))
    days = scene.timesteps
    listed = ", ".join(map(str, days[:4])) + (", ..." if len(days) > 4 else "")
    if card.max_timesteps == 1:
        raise SceneError(
            f"model {card.name!r} takes one date, and the scene is a time series of {len(days)} ({listed}): "
            f"give scene.{name} one source (time series are for models whose card has max_timesteps, e.g. "
            "presto)",
            field=f"scene.{name}",
        )
    known = {i.modality for i in card.inputs}
    unread = sorted(set(scene.series) - known)
    if unread:
        raise SceneError(
            f"model {card.name!r} does not read {unread[0]!r}, whose acquisitions would make timesteps of "
            "nothing; leave it out",
            field=f"scene.{unread[0]}",
        )
    if len(days) > card.max_timesteps:
        raise SceneError(
            f"the time series has {len(days)} dates ({listed}), more than model {card.name!r} takes "
            f"({card.max_timesteps})",
            field=f"scene.{name}",
        )


class ReaderCache(threading.local):
    """Open rio-tiler readers per thread: reopening a COG per tile costs more than reading it.
    Bounded, since a long-lived process (the tiler) meets ever new files."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.readers: dict[str, Reader] = {}

    def get(self, path: str) -> Reader:
        r = self.readers.get(path)
        if r is None:
            if len(self.readers) >= self.size:
                for old in self.readers.values():
                    old.close()
                self.readers.clear()
            # opened inside an environment, so the dataset holds none of its own: rasterio gives a
            # dataset opened outside one a thread-bound environment, and closing it elsewhere (on
            # garbage collection in rasterio >= 1.5, as a thread's cache goes) raises EnvError
            with contextlib.nullcontext() if rasterio.env.hasenv() else rasterio.Env(**GDAL_ENV):
                r = self.readers[path] = Reader(path)
        return r

    def dataset(self, path: str) -> DatasetReader:
        """The open rasterio dataset behind `get(path)` (rio-tiler types it as optional: a
        reader made from a dataset the caller keeps)."""
        ds = self.get(path).dataset
        if ds is None:
            raise RuntimeError(f"no dataset open for {path}")
        return ds


_cache = ReaderCache()


def read_band(
    band: BandFile, tile: Tile, halo: int, resampling: str, count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One band on the grid of `count` tiles in a row starting at `tile`, plus a halo:
    (values float32 [H, W], valid bool [H, W])."""
    h, w = TILE_SIZE + 2 * halo, count * TILE_SIZE + 2 * halo
    first = TMS.xy_bounds(morecantile.Tile(tile.x, tile.y, tile.z))
    last = TMS.xy_bounds(morecantile.Tile(tile.x + count - 1, tile.y, tile.z))
    res = (first.right - first.left) / TILE_SIZE
    bbox = (
        first.left - halo * res,
        first.bottom - halo * res,
        last.right + halo * res,
        first.top + halo * res,
    )
    try:
        with rasterio.Env(**GDAL_ENV):
            img = _cache.get(band.path).part(
                bbox,
                dst_crs="EPSG:3857",
                bounds_crs="EPSG:3857",
                height=h,
                width=w,
                indexes=band.index,
                reproject_method=resampling,
                # float32 out: the resampled values themselves, not rounded into an integer
                # source's type (as tilefm's own sampler, `tilefm.io.warp`)
                vrt_options={"tolerance": WARP_TOLERANCE, "dtype": "float32"},
            )
    except TileOutsideBounds:
        return np.zeros((h, w), np.float32), np.zeros((h, w), bool)
    arr = img.array
    valid = ~np.ma.getmaskarray(arr)[0]
    # invalid pixels hold 0, whatever the nodata value (a NaN would poison a model's sums)
    values = np.where(valid, np.asarray(arr.data[0], dtype=np.float32), np.float32(0))
    return band.to_units(values), valid


def read_tile(scene: Scene, card: ModelCard, tile: Tile, halo: int, warp: str | None = None) -> TileInput:
    return read_row(scene, card, [tile], halo, warp)[0]


def read_row(
    scene: Scene, card: ModelCard, tiles: list[Tile], halo: int, warp: str | None = None
) -> list[TileInput]:
    """Tiles that follow each other in one row, read as one strip per source grid: each source
    pixel is decoded once for the row, and with a halo the neighbours' overlapping halos too.
    `warp`: "auto" or "gdal" (default: the settings'), see `tilefm.io.warp`."""
    if scene.series:
        return _read_series_row(scene, card, tiles, halo, warp)
    t0 = time.perf_counter()
    warp = warp or get_settings().warp
    n = TILE_SIZE + 2 * halo
    names = card_band_names(card)
    # every band with a file is written in place below; only the others are zeroed. One array
    # per tile (2.6 MB for a ViT's), not per row: a row's (84 MB) is above malloc's largest
    # mmap threshold, so it came from the kernel afresh for every row, and faulted in page by
    # page wherever no huge pages were free (`tilefm.engine.memory`)
    data = [np.empty((len(names), n, n), np.float32) for _ in tiles]
    valid = [np.empty((len(names), n, n), bool) for _ in tiles]
    written = np.zeros(len(names), bool)
    extras: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in tiles]
    wavelengths = {k: w for k, w in scene_bands(scene, card).items() if w is not None}
    i = 0
    for inp in card.inputs:
        mod = scene.modalities.get(inp.modality)
        hh = halo + inp.halo
        rows_of = [(i + j, mod.bands[b.name]) for j, b in enumerate(inp.bands) if mod and b.name in mod.bands]
        if inp.halo:  # read with a halo of their own (kept as extras), the core copied into the stack
            m = n + 2 * inp.halo
            dests = [[(np.empty((m, m), np.float32), np.empty((m, m), bool)) for _ in tiles] for _ in rows_of]
        else:
            dests = [[(data[k][r], valid[k][r]) for k in range(len(tiles))] for r, _ in rows_of]
        _read_bands([b for _, b in rows_of], tiles, hh, inp.resampling, warp, dests)
        for (r, _), per_tile in zip(rows_of, dests, strict=True):
            written[r] = True
            if inp.halo:
                core = (slice(inp.halo, inp.halo + n), slice(inp.halo, inp.halo + n))
                for k, (v, o) in enumerate(per_tile):
                    extras[k][names[r]] = (v, o)
                    data[k][r], valid[k][r] = v[core], o[core]
        i += len(inp.bands)
    if not written.all():
        for d, ok in zip(data, valid, strict=True):
            d[~written], ok[~written] = 0.0, False
    share = (time.perf_counter() - t0) / len(tiles)
    return [
        TileInput(
            tile=t,
            halo=halo,
            data=data[k],
            valid=valid[k],
            band_names=names,
            date=scene.date,
            extra=extras[k],
            read_s=share,
            wavelengths=wavelengths,
        )
        for k, t in enumerate(tiles)
    ]


def _read_series_row(
    scene: Scene, card: ModelCard, tiles: list[Tile], halo: int, warp: str | None
) -> list[TileInput]:
    """`read_row` of a time series: each timestep's acquisitions read as a scene of one date,
    the static modalities (given once) read once and put at every timestep. A band a timestep
    lacks (its modality not acquired that day, or no data there) is invalid at that timestep only."""
    t0 = time.perf_counter()
    days = scene.timesteps
    steps = [read_row(scene.timestep(d), card, tiles, halo, warp) for d in days]
    static_scene = scene.static()
    static_rows = np.array(
        [name.split(":", 1)[0] in static_scene.modalities for name in card_band_names(card)]
    )
    static = read_row(static_scene, card, tiles, halo, warp) if static_rows.any() else None
    share = (time.perf_counter() - t0) / len(tiles)
    out = []
    for k, t in enumerate(tiles):
        data = np.stack([s[k].data for s in steps])
        valid = np.stack([s[k].valid for s in steps])
        extra = dict(steps[0][k].extra)
        if static is not None:
            data[:, static_rows] = static[k].data[static_rows]
            valid[:, static_rows] = static[k].valid[static_rows]
            extra.update(static[k].extra)
        out.append(
            TileInput(
                tile=t,
                halo=halo,
                data=data,
                valid=valid,
                band_names=steps[0][k].band_names,
                date=days[0],
                extra=extra,
                read_s=share,
                dates=list(days),
                wavelengths=steps[0][k].wavelengths,
            )
        )
    return out


def _read_bands(
    bands: list[BandFile],
    tiles: list[Tile],
    halo: int,
    resampling: str,
    warp: str,
    into: list[list[tuple[np.ndarray, np.ndarray]]],
) -> None:
    """Each band on each tile of the row plus the halo, written into `into[band][tile]`: (values
    float32, valid bool), [H, W] each. Bands on one source grid are sampled together where
    `tilefm.io.warp` reproduces GDAL's kernel; the rest go through GDAL one band at a time."""
    strip = Strip.of_row(tiles[0].x, tiles[0].y, tiles[0].z, len(tiles), halo)
    chunks = [slice(k * TILE_SIZE, (k + 1) * TILE_SIZE + 2 * halo) for k in range(len(tiles))]
    groups: dict[SourceGrid, list[int]] = {}
    gdal: list[int] = []
    for j, band in enumerate(bands):
        grid = SourceGrid.of(_cache.dataset(band.path)) if warp == "auto" else None
        (groups.setdefault(grid, []) if grid is not None else gdal).append(j)
    with rasterio.Env(**GDAL_ENV):
        for grid, members in groups.items():
            sampler = GridSampler(grid, strip, tolerance=WARP_TOLERANCE)
            if not sampler.supports(resampling):
                gdal.extend(members)
                continue
            datasets = [(_cache.dataset(bands[j].path), bands[j].index) for j in members]
            values_into = [[into[j][k][0] for j in members] for k in range(len(tiles))]
            for k, (_, ok) in enumerate(sampler.sample(datasets, resampling, chunks, values_into)):
                for m, j in enumerate(members):
                    into[j][k][1][...] = ok[m]
                    bands[j].to_units(into[j][k][0])
    for j in gdal:
        band = bands[j]
        if halo == 0 and len(tiles) > 1:
            # GDAL's values depend (within ~1 DN) on the extent read: tile by tile, a pixel's
            # value does not depend on its batch
            got = [read_band(band, t, 0, resampling) for t in tiles]
        else:
            values, ok = read_band(band, tiles[0], halo, resampling, count=len(tiles))
            got = [(values[:, c], ok[:, c]) for c in chunks]
        for (v, o), (dv, do) in zip(got, into[j], strict=True):
            dv[...], do[...] = v, o


def rows(tiles: list[Tile]) -> list[list[Tile]]:
    """Split tiles into runs of horizontal neighbours (same row, consecutive columns)."""
    runs: list[list[Tile]] = []
    for t in tiles:
        if runs and runs[-1][-1].y == t.y and runs[-1][-1].x + 1 == t.x and runs[-1][-1].z == t.z:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def read_tiles(
    scene: Scene, card: ModelCard, tiles: list[Tile], halo: int, warp: str | None = None
) -> list[TileInput]:
    """A batch of tiles, each row of neighbours read as one strip (a pixel's value does not
    depend on its batch, except within GDAL's ~1 DN where GDAL reads a strip with a halo)."""
    return [ti for run in rows(tiles) for ti in read_row(scene, card, run, halo, warp)]
