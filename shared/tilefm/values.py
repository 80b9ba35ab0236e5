"""The values that flow from a model to the mosaic: a tile's output, and how values are stored.

Both are shared by the models (which make `TileOutput`s), the engine (which stitches them) and
the job service and STAC writer (which need the `Encoding`), so they live below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tilefm.card import ModelCard
from tilefm.grid import Tile

#: nodata of a class map (uint8)
CLASS_NODATA = 255
#: nodata of int8-quantized embeddings
INT8_NODATA = -128


@dataclass
class TileOutput:
    """A tile's contribution to the mosaic, over the tile plus its halo.

    `values` are weighted sums (per-pixel models: the values themselves, weight 1) and `weight`
    the sum of weights; the stitcher adds contributions of neighbouring tiles and divides.
    """

    tile: Tile
    halo: int
    #: [C, n, n], float32 or the card's float16 (as a GPU hands it back), any strides: Presto's
    #: are a view of pixel-interleaved embeddings, which the stitcher keeps so
    values: np.ndarray
    weight: np.ndarray  # [n, n] float32, 0 where there was no input
    #: seconds spent reading this tile and its share of the batch's encode (for metrics)
    read_s: float = 0.0
    encode_s: float = 0.0


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
    def for_card(cls, card: ModelCard, dtype: str | None = None) -> Encoding:
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

    def encode_into(
        self, values: np.ndarray, weight: np.ndarray, out: np.ndarray, half: np.ndarray | None = None
    ) -> None:
        """Store blended values (weighted sums / weights) in `out` (a block of a tile, in the
        file's dtype); nodata where nothing contributed. Float16 is rounded here (ties to even),
        so that GDAL's 16-bit store, which truncates, keeps the value exactly; torch converts
        ~15x faster than numpy, and `half` (the values' shape, float16) saves its allocation
        where `out` is float32 (a float16 `out` takes the rounded values directly)."""
        import torch

        valid = weight > 0
        every = bool(valid.all())
        src = torch.from_numpy(values)
        if not (weight[valid] == 1).all():  # blended: divide (outputs of one tile have weight 1)
            src = src / torch.from_numpy(np.where(valid, weight, 1.0).astype(np.float32))
        if self.dtype == "int8":
            self.encode_valid(src, torch.from_numpy(out))
            if not every:
                out[:, ~valid] = INT8_NODATA
            return
        dst = torch.from_numpy(out)
        if self.nbits == 16 and out.dtype != np.float16:
            h = torch.from_numpy(half) if half is not None else torch.empty(src.shape, dtype=torch.float16)
            h.copy_(src)
            dst.copy_(h)
        else:
            dst.copy_(src)
        if not every:
            out[:, ~valid] = np.nan

    def encode_valid(self, src: Any, dst: Any) -> None:
        """`encode_into` for pixels that all had data, each from one tile (weight 1: nothing to
        divide, no nodata), as torch tensors of any layout: rounded as `encode_into` rounds."""
        import torch

        if self.dtype == "int8":
            # in float32 (float16 values, a GPU's, too), in place: one array, not four
            q = src.to(torch.float32, copy=True)
            q.sub_(self.offset).div_(self.scale).round_().clamp_(-127, 127)
            dst.copy_(q)
        elif self.nbits == 16 and dst.dtype != torch.float16:
            dst.copy_(src.to(torch.float16))
        else:
            dst.copy_(src)
