"""A ViT-style multimodal encoder: a wavelength-conditioned patch embedding (DOFA, Xiong et al.
2024, "Neural Plasticity-Inspired Multimodal Foundation Model for Earth Observation") in front of
a plain ViT trunk, giving one embedding per patch.

Why the hypernetwork: one network takes any set of bands from any sensor. Each band's central
wavelength is encoded (1-D sin/cos of the wavelength in nm) and a small transformer turns the
encodings into that band's slice of the patch-projection kernel, so a new band set needs no new
weights. The kernel depends only on the band set, so it is computed once per band set
(`ViTEncoder.bind`) and the bound network is a plain conv + ViT: that is what is exported to
ONNX / TensorRT.

State-dict keys follow DOFA v1's published checkpoint (`DOFA_ViT_base_e100.pth`, classes
`models_dwv.OFAViT` and `wave_dynamic_layer.Dynamic_MLP_OFA` of github.com/zhu-xlab/DOFA):
`patch_embed.weight_generator.{transformer_encoder.layers.0.*, fc_weight, fc_bias, weight_tokens,
bias_token}`, `patch_embed.fclayer.{w1,w2}`, `cls_token`, `blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}` (timm's ViT block) and `norm` (`fc_norm` is read as `norm`). The fixed
sin/cos `pos_embed` is recomputed for the tile's patch grid, and heads/decoders are ignored.
DOFA v2's patch embedding differs and is not read.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tilefm.card import ModelCard, ViTSpec
from tilefm.errors import ModelError, WeightsError

#: central wavelengths in micrometres per "modality:band". Optical bands are the sensors' own
#: (Sentinel-2 MSI, as DOFA uses them). SAR and DEM have no optical wavelength: they get
#: conventional codes, VV 3.5 / VH 4.0 (the values DOFA/Clay-style wrappers feed for Sentinel-1,
#: not the 5.55 cm C-band), and 50.0 for elevation (ours: far from any band DOFA was trained on,
#: so a DEM gets its own kernel slice; a checkpoint has never seen it).
WAVELENGTHS_UM: dict[str, float] = {
    "s2:B01": 0.443, "s2:B02": 0.49, "s2:B03": 0.56, "s2:B04": 0.665, "s2:B05": 0.705,
    "s2:B06": 0.74, "s2:B07": 0.783, "s2:B08": 0.842, "s2:B8A": 0.865, "s2:B09": 0.945,
    "s2:B11": 1.61, "s2:B12": 2.19,
    "s1:vv": 3.5, "s1:vh": 4.0,
    "dem:elevation": 50.0,
}  # fmt: skip

#: DOFA scales the generated kernel and bias by this before use
KERNEL_SCALE = 0.01


def card_wavelengths(card: ModelCard) -> list[float]:
    """Central wavelength (um) of each of the card's bands, in card order."""
    if card.vit is None:
        raise RuntimeError("card.vit is not set")
    table = {**WAVELENGTHS_UM, **card.vit.wavelengths}
    out = []
    for i in card.inputs:
        for b in i.bands:
            key = f"{i.modality}:{b.name}"
            if key not in table:
                raise ModelError(f"no wavelength for band {key!r}; add it to the card's vit.wavelengths")
            out.append(table[key])
    return out


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim]: sin then cos of pos * 10000^(-2i/dim) (MAE / DOFA)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """[gh*gw, dim] fixed position embedding of a patch grid, as MAE/DOFA build it."""
    gy, gx = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    # MAE's meshgrid(grid_w, grid_h) puts the column index first
    return torch.cat([sincos_1d(dim // 2, gx.reshape(-1)), sincos_1d(dim // 2, gy.reshape(-1))], dim=1)


class TransformerWeightGenerator(nn.Module):
    """Wavelength encodings -> per-band kernel slices and one bias (DOFA's hypernetwork)."""

    def __init__(
        self, input_dim: int, output_dim: int, embed_dim: int, num_heads: int = 4, wt_num: int = 128
    ):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=input_dim,
            nhead=num_heads,
            activation="gelu",
            norm_first=False,
            batch_first=False,
            dropout=0.0,
        )
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fc_weight = nn.Linear(input_dim, output_dim)
        self.fc_bias = nn.Linear(input_dim, embed_dim)
        self.wt_num = wt_num
        self.weight_tokens = nn.Parameter(torch.empty(wt_num, input_dim))
        self.bias_token = nn.Parameter(torch.empty(1, input_dim))

    def forward(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.weight_tokens, waves, self.bias_token], dim=0)
        h = self.transformer_encoder(x)
        return self.fc_weight(h[self.wt_num : -1] + waves), self.fc_bias(h[-1])


class FCResLayer(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.w1 = nn.Linear(size, size)
        self.w2 = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.w2(F.relu(self.w1(x))))


class WavelengthPatchEmbed(nn.Module):
    """DOFA's `Dynamic_MLP_OFA`: band wavelengths -> patch-projection kernel [dim, bands, p, p]."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.weight_generator = TransformerWeightGenerator(
            spec.wv_planes, spec.patch * spec.patch * spec.dim, spec.dim
        )
        self.fclayer = FCResLayer(spec.wv_planes)

    def kernel(self, wavelengths_um: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        waves = sincos_1d(s.wv_planes, torch.tensor(wavelengths_um, dtype=torch.float64) * 1000)
        waves = self.fclayer(waves.to(self.fclayer.w1.weight.dtype))
        weight, bias = self.weight_generator(waves)
        weight = weight.view(len(wavelengths_um), s.patch, s.patch, s.dim).permute(3, 0, 1, 2)
        return (weight * KERNEL_SCALE).contiguous(), bias.view(s.dim) * KERNEL_SCALE


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's ViT block (pre-norm), LayerNorm eps 1e-6 as in MAE/DOFA."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Any band set in, per-patch embeddings out. Call `bind(wavelengths)` for a runnable net."""

    pos_embed: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, spec: ViTSpec, tile: int = 256):
        super().__init__()
        self.spec = spec
        self.grid = tile // spec.patch
        self.patch_embed = WavelengthPatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=1e-6)
        # fixed, not learned (DOFA keeps requires_grad=False): rebuilt for the tile's grid
        self.register_buffer("pos_embed", sincos_2d(spec.dim, self.grid, self.grid)[None], persistent=False)

    def init_weights(self, seed: int) -> ViTEncoder:
        """DOFA/timm's initialisation from `seed` (for throughput work when there is no checkpoint)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if (
                    name.startswith("patch_embed.")
                    and p.ndim == 2
                    and not name.endswith(("weight_tokens", "bias_token"))
                ):
                    bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))  # xavier uniform
                    p.uniform_(-bound, bound, generator=g)
                elif name.endswith(("weight_tokens", "bias_token", "cls_token")) or p.ndim == 2:
                    p.normal_(0.0, 0.02, generator=g)
                elif "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                elif name.startswith("patch_embed.") and name.endswith("bias"):
                    p.fill_(0.01)
                else:
                    p.zero_()
        return self

    def bind(self, wavelengths_um: list[float]) -> BoundViT:
        with torch.no_grad():
            weight, bias = self.patch_embed.kernel(wavelengths_um)
        return BoundViT(self, weight, bias)


class BoundViT(nn.Module):
    """The encoder for one band set: [N, bands, H, W] normalised -> [N, dim, H/p, W/p]."""

    pos_embed: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, enc: ViTEncoder, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.spec = enc.spec
        self.patch_weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.patch_bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.cls_token = enc.cls_token
        self.blocks = enc.blocks
        self.norm = enc.norm
        self.register_buffer("pos_embed", enc.pos_embed.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = F.conv2d(x, self.patch_weight, self.patch_bias, stride=s.patch, padding=s.patch_padding)
        N, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)  # the cls position embedding is 0
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 1:]
        return x.transpose(1, 2).reshape(N, D, gh, gw)


def state_sha256(module: nn.Module) -> str:
    """Digest of a module's state (names, shapes, dtypes, values): the model's identity for
    engine caches, the same for a checkpoint and for a seeded init."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype};".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


#: checkpoint keys that are not the encoder (classification heads, MAE decoders, fixed tables)
_IGNORED_PREFIXES = ("head.", "decoder", "mask_token", "pos_embed", "fc_norm.", "projector")


def dofa_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DOFA v1 state dict (possibly prefixed `module.` / `encoder.`) in this module's names."""
    for prefix in ("module.", "encoder.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    out = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    if "norm.weight" not in out and "fc_norm.weight" in state:
        out["norm.weight"], out["norm.bias"] = state["fc_norm.weight"], state["fc_norm.bias"]
    return out


def load_vit(card: ModelCard, weights: Path | None) -> ViTEncoder:
    """The card's encoder, float32, eval mode, on CPU: from a safetensors checkpoint, or from the
    card's seed when it has none."""
    if card.vit is None:
        raise RuntimeError("card.vit is not set")
    net = ViTEncoder(card.vit)
    if weights is None:
        if card.weights.seed is None:
            raise RuntimeError("card.weights.seed is not set")
        return net.init_weights(card.weights.seed).eval()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = dofa_state(load_file(str(weights)))
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"cannot read {str(weights)!r} as safetensors: {e}") from None
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{str(weights)!r} does not hold a {card.vit.dim}-dim, depth-{card.vit.depth} DOFA-layout "
            "encoder "
            f"(missing {', '.join(missing[:5]) or '-'}; unexpected {', '.join(unexpected[:5]) or '-'})"
        )
    return net.float().eval()


def save_vit(net: ViTEncoder, path: Path) -> None:
    """Write an encoder as a safetensors checkpoint in DOFA's key layout."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def upsample(patches: np.ndarray, size: int, mode: str) -> np.ndarray:
    """[N, D, g, g] per-patch embeddings -> [N, D, size, size] per pixel."""
    t = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    if mode == "nearest":
        k = size // patches.shape[-1]
        return np.repeat(np.repeat(patches, k, axis=-2), k, axis=-1)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).numpy()
