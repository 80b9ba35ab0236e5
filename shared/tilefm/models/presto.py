"""Presto encoder (Tseng et al., "Lightweight, Pre-trained Transformers for Remote Sensing
Timeseries"), written from the specification in ``shared/reference/presto/README.md``.

It loads the official weights (``default_model.pt``, the ``encoder.`` keys) and reproduces the
official reference outputs. Unlike the official self-contained encoder, every pixel of a batch may
have its own mask: all tokens are built, dropped tokens are hidden from attention with a key-padding
mask and left out of the final mean, so each pixel gets the result it would get alone.

Inputs of :meth:`PrestoEncoder.forward`:

- ``x[n, t, 17]`` float32, normalised, channels in :data:`BAND_NAMES` order (see :func:`normalize`);
- ``mask[n, t, 17]``, 1 (or any non-zero) = missing;
- ``dynamic_world[n, t]`` int64, classes 0..8, :data:`DW_MISSING` (9) = missing;
- ``latlons[n, 2]`` float32, latitude and longitude in degrees;
- ``month``: 0-based month of timestep 0, as one int, one per pixel ``[n]`` (timestep t then has
  month + t, mod 12), or the month of every timestep as a table ``[n, t]`` (any months, in any
  order: a time series' own dates), or ``[1, t]`` for the same table at every pixel.

Why one module (~520 lines): one model, one file, as the official implementation is: the
normalisation, the token layout and the encoder are read against the paper and the reference
together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tilefm.errors import WeightsError

__all__ = [
    "RAW_BAND_NAMES",
    "BAND_NAMES",
    "NORM_SHIFT",
    "NORM_SCALE",
    "CHANNEL_GROUPS",
    "GROUP_NAMES",
    "DW_MISSING",
    "MAX_TIMESTEPS",
    "EMBED_DIM",
    "normalize",
    "PrestoEncoder",
    "load_presto",
    "run_reference",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

#: Raw (physical) bands accepted by :func:`normalize`, in order. Units: S1 in dB, S2 as integer
#: reflectance x 10000 (no offset), temperature_2m in kelvin, total_precipitation in metres,
#: elevation in metres, slope in degrees.
RAW_BAND_NAMES: tuple[str, ...] = (
    "VV", "VH",
    "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12",
    "temperature_2m", "total_precipitation",
    "elevation", "slope",
)  # fmt: skip

#: Channels of the model input ``x`` (the raw bands normalised, then NDVI).
BAND_NAMES: tuple[str, ...] = RAW_BAND_NAMES + ("NDVI",)

#: normalised = (raw + NORM_SHIFT) / NORM_SCALE, per raw band, computed in float32.
#: (The temperature shift really is -272.15 in the official code.)
NORM_SHIFT: tuple[float, ...] = (25.0, 25.0) + (0.0,) * 10 + (-272.15, 0.0, 0.0, 0.0)
NORM_SCALE: tuple[float, ...] = (25.0, 25.0) + (10000.0,) * 10 + (35.0, 0.03, 2000.0, 50.0)

#: Channel groups: one token per group and timestep (SRTM: one token, from timestep 0), in the
#: official group order; the value is the channel indices of ``x``. Group index = position here.
CHANNEL_GROUPS: dict[str, tuple[int, ...]] = {
    "S1": (0, 1),
    "S2_RGB": (2, 3, 4),
    "S2_Red_Edge": (5, 6, 7),
    "S2_NIR_10m": (8,),
    "S2_NIR_20m": (9,),
    "S2_SWIR": (10, 11),
    "ERA5": (12, 13),
    "SRTM": (14, 15),
    "NDVI": (16,),
}
GROUP_NAMES: tuple[str, ...] = tuple(CHANNEL_GROUPS)
SRTM_GROUP = GROUP_NAMES.index("SRTM")  # 7
NDVI_GROUP = GROUP_NAMES.index("NDVI")  # 8
DW_GROUP = len(GROUP_NAMES)  # 9: channel code of the Dynamic World tokens

B4_INDEX = BAND_NAMES.index("B4")
B8_INDEX = BAND_NAMES.index("B8")
NDVI_INDEX = BAND_NAMES.index("NDVI")

#: Dynamic World classes are 0..8; this value means missing (token dropped).
DW_MISSING = 9
NUM_DW_EMBEDDINGS = 10

MAX_TIMESTEPS = 24
EMBED_DIM = 128
MONTH_DIM = 32
CHANNEL_DIM = 32
POS_DIM = EMBED_DIM - MONTH_DIM - CHANNEL_DIM  # 64

# --------------------------------------------------------------------------------------------
# Normalisation (the official single-pixel input builder, vectorised)
# --------------------------------------------------------------------------------------------


def normalize(raw: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Build the model input from physical values.

    ``raw[n, t, 16]``: bands in :data:`RAW_BAND_NAMES` order (values where ``present`` is False
    are ignored and may be anything, NaN included); ``present[n, t, 16]`` bool.

    Returns ``x[n, t, 17]`` float32 and ``mask[n, t, 17]`` float32 (1 = missing). Masked channels
    hold the official placeholders (raw 0 normalised: VV/VH 1.0, temperature -7.7757, others 0;
    NDVI 0). NDVI is computed from the normalised float32 B4 and B8, is 0 where B8 + B4 <= 0, and
    is unmasked only when both B4 and B8 are present.
    """
    raw = np.asarray(raw)
    present = np.asarray(present, dtype=bool)
    n_raw = len(RAW_BAND_NAMES)
    if raw.ndim != 3 or raw.shape[-1] != n_raw:
        raise ValueError(f"raw must be [n, t, {n_raw}], got shape {raw.shape}")
    if present.shape != raw.shape:
        raise ValueError(f"present must have the shape of raw {raw.shape}, got {present.shape}")

    shift = np.asarray(NORM_SHIFT, dtype=np.float32)
    scale = np.asarray(NORM_SCALE, dtype=np.float32)
    values = np.where(present, raw.astype(np.float32, copy=False), np.float32(0))
    norm = ((values + shift) / scale).astype(np.float32, copy=False)

    b4 = norm[..., B4_INDEX]
    b8 = norm[..., B8_INDEX]
    ndvi_present = present[..., B4_INDEX] & present[..., B8_INDEX]
    denom = b8 + b4
    ok = ndvi_present & (denom > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = np.where(ok, (b8 - b4) / np.where(ok, denom, np.float32(1)), np.float32(0))

    x = np.concatenate([norm, ndvi[..., None].astype(np.float32)], axis=-1)
    present_all = np.concatenate([present, ndvi_present[..., None]], axis=-1)
    mask = (~present_all).astype(np.float32)
    return x, mask


def normalize_torch(raw: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalize` in torch, on the tensors' device (the same float32 operations in the
    same order), so a GPU worker ships raw values and masks instead of normalising on its CPU."""
    shift = torch.tensor(NORM_SHIFT, dtype=torch.float32, device=raw.device)
    scale = torch.tensor(NORM_SCALE, dtype=torch.float32, device=raw.device)
    zero, one = raw.new_zeros(()), raw.new_ones(())
    norm = (torch.where(present, raw.float(), zero) + shift) / scale
    b4, b8 = norm[..., B4_INDEX], norm[..., B8_INDEX]
    ndvi_present = present[..., B4_INDEX] & present[..., B8_INDEX]
    denom = b8 + b4
    ok = ndvi_present & (denom > 0)
    ndvi = torch.where(ok, (b8 - b4) / torch.where(ok, denom, one), zero)
    x = torch.cat([norm, ndvi[..., None]], dim=-1)
    mask = (~torch.cat([present, ndvi_present[..., None]], dim=-1)).float()
    return x, mask


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _position_table(max_t: int = MAX_TIMESTEPS, dim: int = POS_DIM) -> torch.Tensor:
    """Closed form of ``pos_embed``: angle p / 1000^(2 floor(i/2) / dim), sin even, cos odd."""
    p = torch.arange(max_t, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = p / torch.pow(1000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


def _month_table(dim: int = MONTH_DIM) -> torch.Tensor:
    """Closed form of ``month_embed``: angle 2 pi m / 12, sines then cosines."""
    angle = 2 * math.pi * torch.arange(12, dtype=torch.float64) / 12
    half = dim // 2
    return torch.cat(
        [angle.sin()[:, None].expand(12, half), angle.cos()[:, None].expand(12, half)], 1
    ).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # attn_mask: bool [b, 1, 1, n], True = key may be attended to; scale = 1/sqrt(head_dim)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), attn_mask)
        return h + self.mlp(self.norm2(h))


def _shared_months(month: torch.Tensor) -> bool:
    """Whether a month argument is the same for every pixel: one int, or one row of a table."""
    return month.ndim == 0 or (month.ndim == 2 and month.shape[0] == 1)


def month_rows(month: Any, start: int, stop: int) -> Any:
    """Pixels `start`..`stop` of a month argument (an int or a ``[1, t]`` table: as it is)."""
    m = np.asarray(month) if not isinstance(month, torch.Tensor) else month
    return month if m.ndim == 0 or (m.ndim == 2 and m.shape[0] == 1) else month[start:stop]


def _as_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


class PrestoEncoder(nn.Module):
    """The Presto encoder, default configuration. Parameter names are the official state_dict
    keys without the ``encoder.`` prefix."""

    #: the SRTM group's channel numbers (a buffer registered in __init__, like the other groups')
    _ch_SRTM: torch.Tensor

    def __init__(
        self,
        embed_dim: int = EMBED_DIM,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        max_timesteps: int = MAX_TIMESTEPS,
        eps: float = 1e-5,
    ):
        super().__init__()
        if embed_dim != EMBED_DIM:
            raise ValueError("only the default embed_dim (128) is supported")
        self.embed_dim = embed_dim
        self.max_timesteps = max_timesteps
        self.eo_patch_embed = nn.ModuleDict(
            {name: nn.Linear(len(chs), embed_dim) for name, chs in CHANNEL_GROUPS.items()}
        )
        self.dw_embed = nn.Embedding(NUM_DW_EMBEDDINGS, embed_dim)
        self.latlon_embed = nn.Linear(3, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.pos_embed = nn.Parameter(_position_table(max_timesteps), requires_grad=False)
        self.month_embed = nn.Embedding(12, MONTH_DIM)
        self.channel_embed = nn.Embedding(len(GROUP_NAMES) + 1, CHANNEL_DIM)
        with torch.no_grad():
            self.month_embed.weight.copy_(_month_table())
        # channel groups as index buffers (not saved in the state_dict)
        for name, chs in CHANNEL_GROUPS.items():
            self.register_buffer(f"_ch_{name}", torch.tensor(chs, dtype=torch.long), persistent=False)

    # ---------------------------------------------------------------- inputs
    def _months(self, month: Any, n: int, t: int, device: torch.device) -> torch.Tensor:
        """``[n, t]`` 0-based months. A table is taken as it is (mod 12): the official encoder's
        months, one per pixel and timestep; only an int or one per pixel counts up from timestep 0."""
        m = _as_tensor(month, torch.long, device)
        steps = torch.arange(t, device=device)
        if m.ndim == 0:
            m = (m + steps).expand(n, t)
        elif m.ndim == 1:
            if m.shape[0] != n:
                raise ValueError(f"month has {m.shape[0]} entries for {n} pixels")
            m = m[:, None] + steps[None, :]
        elif m.ndim == 2:
            if tuple(m.shape) != (n, t):
                raise ValueError(f"month table must be [{n}, {t}], got {tuple(m.shape)}")
        else:
            raise ValueError("month must be an int, [n] or [n, t]")
        return torch.remainder(m, 12)

    def build_tokens(
        self,
        x: Any,
        mask: Any,
        dynamic_world: Any,
        latlons: Any,
        month: Any = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """All tokens before dropping, in the official order with the location token first.

        Returns ``tokens[n, L, 128]``, ``keep[n, L]`` bool and the ``L`` token names, where
        L = 2 + 9 t (location, 7 groups x t, SRTM, NDVI x t, Dynamic World x t).
        """
        device = self.pos_embed.device
        x = _as_tensor(x, torch.float32, device)
        mask_b = _as_tensor(mask, torch.float32, device) != 0
        dw = _as_tensor(dynamic_world, torch.long, device)
        ll = _as_tensor(latlons, torch.float32, device)
        if x.ndim != 3 or x.shape[-1] != len(BAND_NAMES):
            raise ValueError(f"x must be [n, t, {len(BAND_NAMES)}], got {tuple(x.shape)}")
        n, t, _ = x.shape
        if t < 1 or t > self.max_timesteps:
            raise ValueError(f"timesteps must be 1..{self.max_timesteps}, got {t}")
        if tuple(mask_b.shape) != (n, t, len(BAND_NAMES)):
            raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask_b.shape)}")
        if tuple(dw.shape) != (n, t):
            raise ValueError(f"dynamic_world must be [{n}, {t}], got {tuple(dw.shape)}")
        if tuple(ll.shape) != (n, 2):
            raise ValueError(f"latlons must be [{n}, 2], got {tuple(ll.shape)}")
        # masked values never matter (and may be NaN): zero them
        x = x.masked_fill(mask_b, 0.0)
        # one month (or one table) for every pixel (a scene): the codes are the same for all, so
        # broadcast one row instead of building n identical ones (same sums, a fraction of the
        # memory traffic)
        rows = 1 if _shared_months(_as_tensor(month, torch.long, device)) else n
        months = self._months(month, rows, t, device)

        month_code = self.month_embed(months)  # [rows, t, 32]
        pos = self.pos_embed[0, :t][None].expand(rows, t, POS_DIM)  # [rows, t, 64]
        ch = self.channel_embed.weight

        def codes(group: int) -> torch.Tensor:
            return torch.cat([month_code, ch[group].expand(rows, t, CHANNEL_DIM), pos], dim=-1)

        tokens: list[torch.Tensor] = []
        keeps: list[torch.Tensor] = []
        names: list[str] = []

        # location: unit vector of (lat, lon)
        rad = torch.deg2rad(ll)
        lat, lon = rad[:, 0], rad[:, 1]
        xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)
        tokens.append(self.latlon_embed(xyz)[:, None])
        keeps.append(torch.ones(n, 1, dtype=torch.bool, device=device))
        names.append("latlon")

        def add_group(gi: int) -> None:
            name = GROUP_NAMES[gi]
            idx = getattr(self, f"_ch_{name}")
            tokens.append(self.eo_patch_embed[name](x[..., idx]) + codes(gi))
            keeps.append(~mask_b[..., idx].any(-1))
            names.extend(f"{name}@t{s}" for s in range(t))

        for gi in range(SRTM_GROUP):
            add_group(gi)
        # SRTM: one token from timestep 0, code = [0 | channel | 0]
        idx = self._ch_SRTM
        srtm_code = torch.cat([ch.new_zeros(MONTH_DIM), ch[SRTM_GROUP], ch.new_zeros(POS_DIM)])
        tokens.append((self.eo_patch_embed["SRTM"](x[:, 0, idx]) + srtm_code)[:, None])
        keeps.append(~mask_b[:, 0, idx].any(-1)[:, None])
        names.append("SRTM")
        add_group(NDVI_GROUP)
        # Dynamic World
        if bool(((dw < 0) | (dw > DW_MISSING)).any()):
            raise ValueError(f"dynamic_world classes must be 0..{DW_MISSING} ({DW_MISSING} = missing)")
        dw_keep = dw != DW_MISSING
        tokens.append(self.dw_embed(dw) + codes(DW_GROUP))
        keeps.append(dw_keep)
        names.extend(f"DynamicWorld@t{s}" for s in range(t))

        return torch.cat(tokens, dim=1), torch.cat(keeps, dim=1), names

    # ---------------------------------------------------------------- transformer
    def _run_blocks(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        attn_mask = None if bool(keep.all()) else keep[:, None, None, :]
        h = tokens
        for blk in self.blocks:
            h = blk(h, attn_mask)
        return h

    @staticmethod
    def _compact(tokens: torch.Tensor, keep: torch.Tensor, names: list[str]):
        """Remove the token columns that no pixel of the batch keeps (exact: they are hidden)."""
        cols = keep.any(0)
        if bool(cols.all()):
            return tokens, keep, names
        sel = cols.nonzero().squeeze(1)
        return tokens[:, sel], keep[:, sel], [names[i] for i in sel.tolist()]

    def _encode(self, x, mask, dynamic_world, latlons, month) -> torch.Tensor:
        tokens, keep, names = self.build_tokens(x, mask, dynamic_world, latlons, month)
        tokens, keep, _ = self._compact(tokens, keep, names)
        h = self._run_blocks(tokens, keep)
        k = keep.to(h.dtype)[..., None]
        mean = (h * k).sum(1) / k.sum(1)
        return self.norm(mean)

    def forward(
        self,
        x: Any,
        mask: Any,
        dynamic_world: Any,
        latlons: Any,
        month: Any = 0,
        *,
        chunk_size: int | None = 1024,
    ) -> torch.Tensor:
        """Embeddings ``[n, 128]`` float32. Each pixel may have its own mask.

        ``chunk_size`` pixels are encoded at a time (bounds memory and is faster on CPU;
        results do not depend on it beyond float rounding).
        """
        n = int(x.shape[0])
        if chunk_size is None or n <= chunk_size:
            return self._encode(x, mask, dynamic_world, latlons, month)
        x_t = _as_tensor(x, torch.float32, self.pos_embed.device)
        m_t = _as_tensor(mask, torch.float32, self.pos_embed.device)
        dw_t = _as_tensor(dynamic_world, torch.long, self.pos_embed.device)
        ll_t = _as_tensor(latlons, torch.float32, self.pos_embed.device)
        mo_t = _as_tensor(month, torch.long, self.pos_embed.device)
        out = []
        for s in range(0, n, chunk_size):
            e = s + chunk_size
            mo = mo_t if _shared_months(mo_t) else mo_t[s:e]
            out.append(self._encode(x_t[s:e], m_t[s:e], dw_t[s:e], ll_t[s:e], mo))
        return torch.cat(out, 0)

    def forward_tokens(
        self,
        x: Any,
        mask: Any,
        dynamic_world: Any,
        latlons: Any,
        month: Any = 0,
    ) -> dict[str, Any]:
        """Per-token outputs, for testing. Columns no pixel keeps are removed; ``keep`` tells
        which of the remaining tokens each pixel keeps (select ``keep[i]`` to get pixel i's
        official token arrays, in the official order).

        Returns ``names`` (list of L), ``keep [n, L]`` bool, ``tokens_in``, ``tokens_blocks``
        (after the last block), ``tokens_out`` (final LayerNorm per token), all ``[n, L, 128]``,
        and ``embedding [n, 128]``.
        """
        tokens, keep, names = self.build_tokens(x, mask, dynamic_world, latlons, month)
        tokens, keep, names = self._compact(tokens, keep, names)
        h = self._run_blocks(tokens, keep)
        k = keep.to(h.dtype)[..., None]
        return {
            "names": names,
            "keep": keep,
            "tokens_in": tokens,
            "tokens_blocks": h,
            "tokens_out": self.norm(h),
            "embedding": self.norm((h * k).sum(1) / k.sum(1)),
        }


# --------------------------------------------------------------------------------------------
# Loading and verification
# --------------------------------------------------------------------------------------------


def load_presto(weights_path: str | Path) -> PrestoEncoder:
    """A :class:`PrestoEncoder` with the official weights (the ``encoder.`` keys of the
    state_dict at ``weights_path``, loaded strictly), float32, eval mode, on CPU.

    Raises :class:`tilefm.errors.WeightsError` if the file is missing, unreadable or does not
    hold a matching Presto encoder.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise WeightsError(f"Presto weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read is a weights problem
        raise WeightsError(f"cannot read Presto weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} is not a PyTorch state_dict")
    prefix = "encoder."
    enc = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not enc:
        raise WeightsError(f"{path} has no '{prefix}' keys: not a Presto encoder-decoder state_dict")
    model = PrestoEncoder()
    try:
        model.load_state_dict({k: v.float() for k, v in enc.items()}, strict=True)
    except (RuntimeError, AttributeError) as exc:
        raise WeightsError(f"{path} does not match the Presto encoder: {exc}") from exc
    return model.float().eval()


def run_reference(model: PrestoEncoder, npz_path: str | Path) -> dict[str, Any]:
    """Run ``model`` on a reference file's inputs and compare with its ``embedding``.

    Returns ``{"max_abs_diff": float, "pixels": int, "embedding": np.ndarray [n, 128]}``.
    """
    with np.load(npz_path, allow_pickle=False) as ref:
        inputs = {k: ref[k] for k in ("x", "mask", "dynamic_world", "latlons", "month")}
        expected = ref["embedding"]
    with torch.inference_mode():
        emb = model(
            inputs["x"], inputs["mask"], inputs["dynamic_world"], inputs["latlons"], int(inputs["month"])
        )
    emb_np = emb.detach().cpu().numpy().astype(np.float32)
    return {
        "max_abs_diff": float(np.abs(emb_np.astype(np.float64) - expected).max()),
        "pixels": int(emb_np.shape[0]),
        "embedding": emb_np,
    }
