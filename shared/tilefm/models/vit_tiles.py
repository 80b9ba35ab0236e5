"""The ViT encoder on tiles: each tile is one 256-pixel window, its bands those with data.

A tile's band set is the card bands with at least one valid pixel in it, at the centre
wavelengths the scene's sensor states for them (Landsat OLI's blue at 0.482 um, not MSI's 0.490;
the card's table where the scene says nothing); the hypernetwork makes the patch kernel for that
set, and the backend runner for it is built once and reused (a scene usually has one band set).
Missing pixels of a present band are set to the band mean (0 after normalising) and get weight
0 in the mosaic. Per-patch embeddings stay at patch stride (card
`vit.upsample: none`: a 16 x 16 output per tile, the mosaic four zooms coarser) or are upsampled
to pixels; patches do not see across tile edges, so a bilinear upsample still steps there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tilefm.backends import (
    GPU_BACKENDS,
    BackendOptions,
    Done,
    Pending,
    Runner,
    make_runner,
    resolve_precision,
)
from tilefm.card import ModelCard
from tilefm.errors import SceneError
from tilefm.grid import TILE_SIZE, Tile
from tilefm.io.read import TileInput, card_band_names
from tilefm.models.base import InputPreparer, TileModel, normalize_coefficients
from tilefm.models.vit import card_wavelengths, load_vit, state_sha256, upsample
from tilefm.values import TileOutput

log = logging.getLogger(__name__)

#: tiles per runner call on a CPU backend (TILEFM_MAX_BATCH=0)
CPU_BATCH = 8


def half_outputs(card: ModelCard, backend: str, out_dtype: str | None = None) -> bool:
    """Whether the runner hands back float16: on a GPU backend, where the run stores float16
    (`out_dtype`, the job's; None: the card's) and the outputs stay at patch stride, so the
    stitcher stores them as they come (an upsample would round twice). Rounded on the device,
    they are the same values the stitcher would have stored, at half the copies."""
    return (
        backend in GPU_BACKENDS and card.output_stride > 1 and (out_dtype or card.output.dtype) == "float16"
    )


def options_from_settings(
    card: ModelCard,
    backend: str,
    threads: int | None = None,
    precision: str | None = None,
    out_dtype: str | None = None,
) -> BackendOptions:
    """`precision`: the run's (None: TILEFM_PRECISION); `out_dtype`: the dtype the run stores
    (None: the card's)."""
    from tilefm.settings import get_settings

    s = get_settings()
    return BackendOptions(
        precision=resolve_precision(card, backend, precision or s.precision),
        max_batch=s.max_batch,
        compile=s.torch_compile,
        cuda_graphs=s.cuda_graphs,
        engine_cache=s.engine_cache,
        threads=threads,
        model_name=card.name,
        out_dtype="float16" if half_outputs(card, backend, out_dtype) else "float32",
    )


class BandSet(NamedTuple):
    """The bands a tile is encoded with: their indices among the card's bands, and the centre
    wavelength of each (the scene's sensor's, else the card's). A runner is bound per set."""

    indices: tuple[int, ...]
    wavelengths_um: tuple[float, ...]


class ViTInputs(InputPreparer):
    """Per tile: the band set with data, the normalised stack with gaps at 0, and the weight of
    each output pixel in the mosaic (computed here, in the reader, not on the thread that
    feeds the GPU)."""

    def tile(self, t: TileInput) -> tuple[BandSet, np.ndarray, np.ndarray]:
        """(band set, normalised input [bands, 256, 256] with gaps at 0, output weight: float32
        [256 / stride, 256 / stride], a patch 1 where most of its pixels had every band)."""
        h = t.halo
        core = (slice(None), slice(h, h + TILE_SIZE), slice(h, h + TILE_SIZE))
        valid = t.valid[core]
        present = tuple(int(i) for i in np.flatnonzero(valid.any(axis=(1, 2))))
        bands = self.band_set(present, t.wavelengths, t.band_names)
        # the bands with data, each copied, scaled and shifted while it is in cache (the others
        # are never touched): 30% faster than a fancy-indexed copy scaled as a whole
        sel = list(present)
        scale, shift = self._affine
        src = t.data[core]
        x = np.empty((len(sel), *src.shape[1:]), np.float32)
        for i, b in enumerate(sel):
            np.multiply(src[b], scale[b], out=x[i])
            if shift[b, 0, 0]:  # S2's reflectances have none
                x[i] += shift[b]
        ok = valid[sel]
        every = np.asarray(ok.all(axis=0))
        if not every.all():
            x[~ok] = 0.0
        stride = self.card.output_stride
        n = TILE_SIZE // stride
        if not present:  # nothing to see
            return bands, x, np.zeros((n, n), np.float32)
        if stride == 1:
            return bands, x, every.astype(np.float32)
        return bands, x, (every.reshape(n, stride, n, stride).mean(axis=(1, 3)) >= 0.5).astype(np.float32)

    def band_set(
        self, indices: tuple[int, ...], scene: dict[str, float] | None = None, names: list[str] | None = None
    ) -> BandSet:
        """The set of the card's bands `indices`, at the wavelengths `scene` states ("modality:band"
        -> um, `TileInput.wavelengths`; `names` the card's band names), else the card's."""
        if not hasattr(self, "_wavelengths"):
            self._wavelengths = card_wavelengths(self.card)
        waves = self._wavelengths
        if scene and names:
            waves = [scene.get(n, w) for n, w in zip(names, waves, strict=True)]
        return BandSet(indices, tuple(waves[i] for i in indices))

    @property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """`normalize` as data * scale + shift, per band (computed once)."""
        if not hasattr(self, "_coefficients"):
            self._coefficients = normalize_coefficients(self.card)
        return self._coefficients

    def __call__(self, tiles: list[TileInput]) -> ViTBatch:
        return ViTBatch([t.tile for t in tiles], [self.tile(t) for t in tiles])


@dataclass
class ViTBatch:
    """A prepared batch: the tiles and, per tile, (band set, normalised stack, output weight)."""

    tiles: list[Tile]
    #: per tile: band set, normalised stack, output weight (`ViTInputs.tile`)
    parts: list[tuple[BandSet, np.ndarray, np.ndarray]]


class ViTTileModel(TileModel):
    preparer: ViTInputs

    def __init__(
        self,
        card: ModelCard,
        backend: str,
        weights: Path | None,
        *,
        threads: int | None = None,
        options: BackendOptions | None = None,
        precision: str | None = None,
        out_dtype: str | None = None,
    ):
        """`out_dtype`: the dtype the run stores (None: the card's); see `half_outputs`."""
        super().__init__(card, backend)
        if card.vit is None:
            raise RuntimeError("card.vit is not set")
        self.net = load_vit(card, weights)
        self.wavelengths = card_wavelengths(card)
        self.options = options or options_from_settings(card, backend, threads, precision, out_dtype)
        self.precision = self.options.precision
        if self.options.max_batch <= 0:  # auto: from the GPU's memory, or CPU_BATCH
            self.options = replace(self.options, max_batch=self._auto_batch())
        self._runners: dict[BandSet, Runner] = {}

    def _auto_batch(self) -> int:
        """On a GPU, the batch its free memory holds for the full band set (`probe_batch`),
        capped by TILEFM_BATCH_CAP; on a CPU, CPU_BATCH."""
        if self.backend not in GPU_BACKENDS:
            return CPU_BATCH
        from tilefm.backends.torch_cuda import probe_batch
        from tilefm.settings import get_settings

        bound = self.net.bind(self.wavelengths)
        n = probe_batch(
            bound,
            (len(self.wavelengths), TILE_SIZE, TILE_SIZE),
            precision=self.precision,
            cap=get_settings().batch_cap,
        )
        log.info("%s: batch %d from free GPU memory", self.card.name, n)
        return n

    def batch_size(self) -> int | None:
        return self.options.max_batch if self.backend in GPU_BACKENDS else None

    def band_set(self, bands: tuple[int, ...] | BandSet) -> BandSet:
        """`bands` as a BandSet: card band indices alone stand for the card's wavelengths."""
        return bands if isinstance(bands, BandSet) else self.preparer.band_set(tuple(bands))

    def runner(self, bands: tuple[int, ...] | BandSet) -> Runner:
        """The backend runner for one band set (built on first use: export, engine, graphs)."""
        bands = self.band_set(bands)
        if bands not in self._runners:
            t0 = time.perf_counter()
            bound = self.net.bind(list(bands.wavelengths_um))
            calibration = None
            if self.backend == "tensorrt" and self.options.precision == "int8":
                from tilefm.backends.calibration import require_calibration
                from tilefm.settings import get_settings

                calibration = require_calibration(self.card, get_settings().model_store, bands.indices)
            self._runners[bands] = make_runner(
                bound,
                self.backend,
                (len(bands.indices), TILE_SIZE, TILE_SIZE),
                self.options,
                model_sha256=state_sha256(bound),
                calibration=calibration,
            )
            log.info(
                "%s on %s (%s) for %d bands (%s um) ready in %.1f s",
                self.card.name,
                self.backend,
                self.options.precision,
                len(bands.indices),
                ", ".join(f"{w:g}" for w in bands.wavelengths_um),
                time.perf_counter() - t0,
            )
        return self._runners[bands]

    def warm(self, modalities: Iterable[str], bands: Mapping[str, float | None] | None = None) -> None:
        """The runner for the band set the scene has where all its bands have data (the usual
        one), through one batch of zeros (compile, graph capture). `bands`: the card bands the
        scene has, at the wavelengths its sensor states (`read.scene_bands`); without it, every
        band of the `modalities`, at the card's."""
        wanted = set(modalities)
        names = card_band_names(self.card)
        present = tuple(
            i for i, n in enumerate(names) if (n in bands if bands is not None else n.split(":")[0] in wanted)
        )
        if present:
            waves = {n: w for n, w in (bands or {}).items() if w is not None}
            band_set = self.preparer.band_set(present, waves, names)
            self.runner(band_set)(np.zeros((1, len(present), TILE_SIZE, TILE_SIZE), np.float32))

    def inputs(self, t: TileInput) -> tuple[BandSet, np.ndarray, np.ndarray]:
        return self.preparer.tile(t)

    def embed(self, bands: tuple[int, ...] | BandSet, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Per-patch embeddings [N, dim, 16, 16] (`options.out_dtype`) for a stack (or sequence)
        of tiles of one band set (the model alone)."""
        run = self.runner(bands)
        step = self.options.max_batch
        outs = [run(x[i : i + step]) for i in range(0, len(x), step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def launch_embed(self, bands: tuple[int, ...] | BandSet, x: Sequence[np.ndarray]) -> Pending:
        """`embed`, queued where the runner can queue (GPU runners): the tiles go straight into
        its pinned memory, without a stacked copy first; elsewhere computed now."""
        run = self.runner(bands)
        if hasattr(run, "launch"):
            return run.launch(x)
        return Done(self.embed(bands, x))

    def run(self, prepared: ViTBatch) -> list[TileOutput]:
        return self.launch(prepared)()

    def launch(self, prepared: ViTBatch) -> Callable[[], list[TileOutput]]:
        """Queue each band set's tiles on the runner; what the outputs need of the input (the
        tiles' weights) is copied now, since the input's memory may be reused once this returns."""
        tiles, parts = prepared.tiles, prepared.parts
        C = self.card.output.channels
        stride = self.card.output_stride
        n = TILE_SIZE // stride
        groups: dict[BandSet, list[int]] = {}
        for k, (bands, _, _) in enumerate(parts):
            groups.setdefault(bands, []).append(k)
        queued: list[tuple[list[int], Pending, list[np.ndarray]]] = []
        empty: list[int] = []
        for bands, idx in groups.items():
            if not bands.indices:  # nothing to see: weight 0 everywhere
                empty.extend(idx)
                continue
            weights = [parts[k][2].copy() for k in idx]  # a few kB each at patch stride
            queued.append((idx, self.launch_embed(bands, [parts[k][1] for k in idx]), weights))

        def finish() -> list[TileOutput]:
            outs: list[TileOutput | None] = [None] * len(tiles)
            dtype = np.dtype(self.options.out_dtype)  # as the runner's: the stitcher groups by it
            for k in empty:
                outs[k] = TileOutput(
                    tile=tiles[k],
                    halo=0,
                    values=np.zeros((C, n, n), dtype),
                    weight=np.zeros((n, n), np.float32),
                )
            for idx, pending, weights in queued:
                emb = pending.result()
                for j, k in enumerate(idx):
                    values = (
                        emb[j]
                        if stride > 1
                        # a ViT card always has its `vit` section (checked when the model is made)
                        else upsample(emb[j : j + 1], TILE_SIZE, self.card.vit.upsample)[0]  # type: ignore[union-attr]
                    )
                    outs[k] = TileOutput(tile=tiles[k], halo=0, values=values, weight=weights[j])
            if any(o is None for o in outs):
                raise SceneError("internal: a tile got no output")
            return [o for o in outs if o is not None]  # all of them (checked above)

        return finish
