"""Presto on tiles: every pixel of a tile is one Presto input, of one timestep per date.

Bands the scene lacks are masked (their tokens dropped), location is each pixel's own lat/lon, the
month is the scene's. A time series (`tilefm.io.scene.Scene.series`) gives every pixel one timestep
per date, each with its own month (the encoder takes the months as a table, never assuming
consecutive ones), a band without data at one date masked at that timestep only. A DEM modality
gives elevation and a Horn slope, computed on the tile plus a one-pixel halo so that slopes agree
across tile edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tilefm.card import ModelCard
from tilefm.errors import SceneError
from tilefm.grid import TILE_SIZE, Tile, resolution
from tilefm.io.read import TileInput, tile_latitudes
from tilefm.models.base import InputPreparer, TileModel
from tilefm.models.presto import (
    DW_MISSING,
    RAW_BAND_NAMES,
    load_presto,
    month_rows,
    normalize,
    normalize_torch,
)
from tilefm.values import TileOutput

#: card band "modality:name" -> Presto raw band
CARD_TO_RAW = {
    "s1:vv": "VV", "s1:vh": "VH",
    "s2:B02": "B2", "s2:B03": "B3", "s2:B04": "B4", "s2:B05": "B5", "s2:B06": "B6", "s2:B07": "B7",
    "s2:B08": "B8", "s2:B8A": "B8A", "s2:B11": "B11", "s2:B12": "B12",
    "dem:elevation": "elevation",
}  # fmt: skip


def horn_slope(
    elev: np.ndarray, valid: np.ndarray, cell_x: np.ndarray, cell_y: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slope in degrees by Horn's 3x3 method on the interior of `elev` (output is 2 px smaller).

    `cell_x`/`cell_y` are ground cell sizes in metres (per row for web mercator). Valid where all
    nine cells are valid.
    """
    z = elev.astype(np.float64)
    a, b, c = z[:-2, :-2], z[:-2, 1:-1], z[:-2, 2:]
    d, f = z[1:-1, :-2], z[1:-1, 2:]
    g, h, i = z[2:, :-2], z[2:, 1:-1], z[2:, 2:]
    dzdx = ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * cell_x)
    dzdy = ((g + 2 * h + i) - (a + 2 * b + c)) / (8 * cell_y)
    slope = np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)
    v = valid
    ok = np.ones_like(slope, bool)
    for dy in range(3):
        for dx in range(3):
            ok &= v[dy : dy + slope.shape[0], dx : dx + slope.shape[1]]
    return slope, ok


#: pixels per forward pass: small chunks are faster on CPU (cache), large ones fill a GPU
CPU_CHUNK, GPU_CHUNK = 1024, 1 << 18
#: tiles per batch on a GPU
GPU_BATCH = 16


class PrestoInputs(InputPreparer):
    """The tiles' valid pixels as Presto's arrays (slopes included), concatenated."""

    def __init__(self, card: ModelCard):
        super().__init__(card)
        names = [f"{i.modality}:{b.name}" for i in card.inputs for b in i.bands]
        self.raw_index = {n: RAW_BAND_NAMES.index(CARD_TO_RAW[n]) for n in names}
        self.elev_name = "dem:elevation" if "dem:elevation" in names else None

    def pixels(self, t: TileInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(raw [n_pix, T, 16], present [n_pix, T, 16], latlons [n_pix, 2], pixel validity
        [256, 256]): T timesteps (1 for a scene of one date); a pixel is valid where any band has
        a value at any timestep."""
        h = t.halo
        core = (slice(h, h + TILE_SIZE), slice(h, h + TILE_SIZE))
        data, valid = (t.data, t.valid) if t.dates else (t.data[None], t.valid[None])
        steps = data.shape[0]
        raw = np.zeros((TILE_SIZE, TILE_SIZE, steps, len(RAW_BAND_NAMES)), np.float32)
        present = np.zeros(raw.shape, bool)
        for j, name in enumerate(t.band_names):
            k = self.raw_index[name]
            for s in range(steps):
                raw[:, :, s, k] = data[s, j][core]
                present[:, :, s, k] = valid[s, j][core]
        if self.elev_name in t.extra:
            elev, elev_ok = t.extra[self.elev_name]  # the tile plus one pixel, for the 3x3 kernel
            e = (elev.shape[0] - TILE_SIZE) // 2 - 1
            elev, elev_ok = (
                elev[e : elev.shape[0] - e, e : elev.shape[1] - e],
                elev_ok[e : elev.shape[0] - e, e : elev.shape[1] - e],
            )
            lat = tile_latitudes(t.tile, TILE_SIZE + 2, 1)
            cell = (resolution(t.tile.z) * np.cos(np.radians(lat)))[1:-1, None]
            slope, ok = horn_slope(elev, elev_ok, cell, cell)
            k = RAW_BAND_NAMES.index("slope")
            raw[..., k] = slope[..., None]  # a static DEM: the same slope at every timestep
            present[..., k] = ok[..., None] & present[..., RAW_BAND_NAMES.index("elevation")]
        pix_valid = np.asarray(present.any(axis=(-2, -1)))
        lon, lat = t.lonlat()
        latlons = np.stack([lat[core], lon[core]], axis=-1).astype(np.float32)
        sel = pix_valid.ravel()
        n = int(sel.sum())
        shape = (-1, steps, raw.shape[-1])
        return (
            (
                raw.reshape(shape)[sel],
                present.reshape(shape)[sel],
                latlons.reshape(-1, 2)[sel],
                pix_valid,
            )
            if n
            else (
                np.zeros((0, steps, raw.shape[-1]), np.float32),
                np.zeros((0, steps, raw.shape[-1]), bool),
                np.zeros((0, 2), np.float32),
                pix_valid,
            )
        )

    @staticmethod
    def months(t: TileInput) -> list[int]:
        """The 0-based month of each of a tile's timesteps (one for a scene of one date)."""
        if t.date is None:
            raise SceneError("Presto needs the scene date (month)", field="date")
        return [d.month - 1 for d in t.dates or [t.date]]

    def __call__(self, tiles: list[TileInput]) -> PrestoBatch:
        if not tiles:
            return PrestoBatch([], 0, [], *(np.zeros((0,)) for _ in range(3)))
        tables = [self.months(t) for t in tiles]
        parts = [self.pixels(t) for t in tiles]
        raw, present, latlons = (np.concatenate([p[k] for p in parts]) for k in range(3))
        month: int | np.ndarray
        if not tiles[0].dates:
            month = tables[0][0]
        elif all(m == tables[0] for m in tables):  # one scene: one table for every pixel
            month = np.array([tables[0]], np.int64)
        else:
            month = np.concatenate(
                [np.tile(np.array(m, np.int64), (len(p[0]), 1)) for m, p in zip(tables, parts, strict=True)]
            )
        return PrestoBatch([t.tile for t in tiles], month, [p[3] for p in parts], raw, present, latlons)


@dataclass
class PrestoBatch:
    """A prepared batch: the tiles, the months, each tile's pixel validity, and the valid pixels
    of all tiles as Presto's arrays ([n, T, 16]: T timesteps)."""

    tiles: list[Tile]
    #: a scene of one date: its 0-based month; a time series: the 0-based month of every
    #: timestep, [1, T] (the same for every pixel) or [n, T]
    month: int | np.ndarray
    valid: list[np.ndarray]
    raw: np.ndarray
    present: np.ndarray
    latlons: np.ndarray


class PrestoTileModel(TileModel):
    preparer: PrestoInputs

    def __init__(
        self,
        card: ModelCard,
        backend: str,
        weights: Path,
        *,
        threads: int | None = None,
        precision: str | None = None,
        out_dtype: str | None = None,
    ):
        super().__init__(card, backend)
        if backend not in ("torch", "torch-cuda"):
            raise ValueError(f"Presto runs on torch or torch-cuda, not {backend!r}")
        if threads:
            torch.set_num_threads(threads)
        self.net = load_presto(weights)
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.chunk = CPU_CHUNK
        if backend == "torch-cuda":
            from tilefm.backends import resolve_precision
            from tilefm.errors import BackendError
            from tilefm.settings import get_settings

            if not torch.cuda.is_available():
                raise BackendError("backend 'torch-cuda' needs a CUDA GPU and none is visible to PyTorch")
            self.precision = resolve_precision(card, backend, precision or get_settings().precision)
            self.device = torch.device("cuda")
            self.net = self.net.to(self.device)
            self.chunk = GPU_CHUNK
        #: dtype embeddings come back in from the GPU: the card's (float16 halves the copy)
        self.out_dtype = torch.float16 if (out_dtype or card.output.dtype) == "float16" else torch.float32

    def batch_size(self) -> int | None:
        """On a GPU, 16 tiles per batch (~1 M pixels, 4 of the double-buffered chunks: the H100
        runs in docs/benchmarks.md); on a CPU, no preference."""
        return GPU_BATCH if self.device.type == "cuda" else None

    def pixels(self, t: TileInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.preparer.pixels(t)

    def run(self, prepared: PrestoBatch) -> list[TileOutput]:
        if not prepared.tiles:
            return []
        raw, present, latlons, month = prepared.raw, prepared.present, prepared.latlons, prepared.month
        emb = self.embed(raw, present, latlons, month)
        outs, start = [], 0
        C, n = emb.shape[1], TILE_SIZE * TILE_SIZE
        for t, valid in zip(prepared.tiles, prepared.valid, strict=True):
            k = int(valid.sum())
            # pixel-interleaved, as the embeddings come and as the COG stores them: a tile's
            # rows of `emb` are its values (no copy), and the stitcher never transposes them.
            # Transposing to bands-first here took ~45 ms a tile on the device thread, GIL held.
            if k == n:
                values = emb[start : start + k]
            else:
                values = np.zeros((n, C), emb.dtype)
                values[valid.ravel()] = emb[start : start + k]
            start += k
            values = values.reshape(TILE_SIZE, TILE_SIZE, C).transpose(2, 0, 1)  # [C, H, W], a view
            outs.append(TileOutput(tile=t, halo=0, values=values, weight=valid.astype(np.float32)))
        return outs

    def embed(
        self, raw: np.ndarray, present: np.ndarray, latlons: np.ndarray, month: int | np.ndarray
    ) -> np.ndarray:
        """Embeddings [n, 128] for pixels of T timesteps, raw and present [n, T, 16] (the model
        alone, no I/O). `month`: timestep 0's (an int: T = 1, or consecutive months), or the
        month of every timestep as a [1, T] or [n, T] table (`PrestoEncoder.forward`)."""
        if len(raw) == 0:
            return np.zeros((0, self.card.output.channels), np.float32)
        if self.device.type == "cuda":
            return self._embed_cuda(raw, present, latlons, month)
        x, mask = normalize(raw, present)
        dw = np.full(x.shape[:2], DW_MISSING, np.int64)
        with torch.inference_mode():
            return self.net(x, mask, dw, latlons, month, chunk_size=self.chunk_for(raw)).numpy()

    def chunk_for(self, raw: np.ndarray) -> int:
        """Pixels per forward pass for inputs of T timesteps: a pixel has about T times a
        single date's tokens (and attention T^2 times), so T times fewer pixels keep a chunk's
        memory near what the chunk size was set for."""
        return max(1, self.chunk // raw.shape[1])

    @torch.inference_mode()
    def _embed_cuda(
        self, raw: np.ndarray, present: np.ndarray, latlons: np.ndarray, month: int | np.ndarray
    ) -> np.ndarray:
        """Raw values and masks go to the GPU (normalised there, in chunks); embeddings come back
        in the card's output dtype (float16: half the bytes over PCIe, and what the COG stores).

        Chunks are double-buffered through pinned host memory: copies in and out are queued
        without blocking, so while the GPU runs chunk i the CPU stages chunk i+1 and unpacks
        chunk i-1 (pageable copies made every chunk wait for the GPU to drain: ~30% idle)."""
        dev = self.device
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        stream = torch.cuda.current_stream(dev)
        n = len(raw)
        out = np.empty(
            (n, self.card.output.channels),
            dtype=np.float16 if self.out_dtype == torch.float16 else np.float32,
        )
        inputs = (raw, present, latlons.astype(np.float32, copy=False))
        chunk = self.chunk_for(raw)
        slots = self._pinned_slots(inputs, out, chunk)
        for i, s in enumerate(range(0, n, chunk)):
            e = min(n, s + chunk)
            slot = slots[i % len(slots)]
            slot.drain(out)  # its copies from two chunks ago are done; their output unpacked
            k = e - s
            dev_in = []
            for host, a in zip(slot.host, inputs, strict=True):
                np.copyto(host[:k].numpy(), a[s:e])
                dev_in.append(host[:k].to(dev, non_blocking=True))
            r, p, ll = dev_in
            x, mask = normalize_torch(r, p)
            dw = torch.full(x.shape[:2], DW_MISSING, dtype=torch.long, device=dev)
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                y = self.net._encode(x, mask, dw, ll, month_rows(month, s, e))
            slot.out[:k].copy_(y.to(self.out_dtype), non_blocking=True)
            slot.done.record(stream)
            slot.pending = (s, e)
        for slot in slots:
            slot.drain(out)
        return out

    def _pinned_slots(self, inputs: tuple[np.ndarray, ...], out: np.ndarray, chunk: int) -> list[_PinnedSlot]:
        """Two slots of pinned buffers for this chunk size and these shapes, kept across calls
        (pinning is slow: ~ms per 10 MB)."""
        key = (chunk, out.dtype.str, out.shape[1:], *((a.dtype.str, a.shape[1:]) for a in inputs))
        if getattr(self, "_slots_key", None) != key:
            self._slots = [_PinnedSlot(chunk, inputs, out) for _ in range(2)]
            self._slots_key = key
        for slot in self._slots:  # a call that raised may have left copies in flight: not this call's rows
            slot.done.synchronize()
            slot.pending = None
        return self._slots


class _PinnedSlot:
    """One chunk's pinned host buffers (inputs and output) and the event that says the GPU has
    finished copying both."""

    def __init__(self, chunk: int, inputs: tuple[np.ndarray, ...], out: np.ndarray):
        self.host = [
            torch.empty((chunk, *a.shape[1:]), dtype=torch.from_numpy(a[:0]).dtype, pin_memory=True)
            for a in inputs
        ]
        self.out = torch.empty(
            (chunk, *out.shape[1:]), dtype=torch.from_numpy(out[:0]).dtype, pin_memory=True
        )
        self.done = torch.cuda.Event()
        self.pending: tuple[int, int] | None = None

    def drain(self, out: np.ndarray) -> None:
        if self.pending is None:
            return
        self.done.synchronize()
        s, e = self.pending
        out[s:e] = self.out[: e - s].numpy()
        self.pending = None
