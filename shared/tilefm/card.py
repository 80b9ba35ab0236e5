"""Model cards: the project's own description of a model, enough to feed it a scene and write its
output. One YAML file per model in `cards/`; the fields are documented in docs/model-cards.md."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator


class Band(BaseModel):
    """One input band and how raw values become model values: (raw * scale + shift - mean) / std."""

    name: str
    units: str = ""
    scale: float = 1.0
    shift: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    #: bands (by id, in order of preference) read in this one's place where the scene lacks it:
    #: a close equivalent the model was trained to take, e.g. Landsat OLI's NIR (B8A) for B08
    alternatives: list[str] = Field(default_factory=list)


class Input(BaseModel):
    """One modality the model reads. `required` bands must all be in the scene; optional ones are
    masked where absent."""

    modality: str
    bands: list[Band]
    required: bool = True
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    #: extra pixels read around each tile for inputs the model derives from neighbours (slopes)
    halo: int = 0
    description: str = ""

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]


class OutputClass(BaseModel):
    value: int
    name: str
    color: str  # "#rrggbb"

    @field_validator("color")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not (len(v) == 7 and v.startswith("#")):
            raise ValueError(f"color must be #rrggbb, got {v!r}")
        int(v[1:], 16)
        return v.lower()


class Output(BaseModel):
    kind: Literal["embedding", "classes", "regression"]
    channels: int
    classes: list[OutputClass] = Field(default_factory=list)
    #: stored dtype; embeddings may be float16 or int8 (then `value_range` sets scale/offset)
    dtype: Literal["float16", "float32", "int8", "uint8"] = "float16"
    value_range: tuple[float, float] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Output:
        if self.kind == "classes" and not self.classes:
            raise ValueError("a class output needs its classes")
        return self


class Context(BaseModel):
    """How the model sees space. `window` is the model's input size in pixels; windows overlap by
    `overlap` pixels and their scores are blended (0 for per-pixel models)."""

    per_pixel: bool = False
    window: int = 256
    overlap: int = 0
    blend: Literal["sine", "none"] = "sine"
    #: where the windows are laid: `tile` = on the output's web-mercator tiles (inputs resampled
    #: onto them); `native` = on the scene's own pixel grid (coarsened to `gsd_m` where the scene
    #: is much finer), the blended scores then resampled onto the tiles (`tilefm.io.native`). Models
    #: with spatial context answer for the texture they are shown, and resampled imagery is not
    #: what they were trained on
    grid: Literal["tile", "native"] = "tile"

    @model_validator(mode="after")
    def _check(self) -> Context:
        stride = self.window - self.overlap
        if stride <= 0 or self.overlap % 2:
            raise ValueError("overlap must be even and smaller than window")
        if not self.per_pixel and self.grid == "tile" and 256 % stride:
            raise ValueError(f"window - overlap ({stride}) must divide the 256-pixel tile")
        if self.per_pixel and self.grid == "native":
            raise ValueError("per-pixel models read on the tile grid (grid: tile)")
        return self

    @property
    def native(self) -> bool:
        return self.grid == "native"

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    @property
    def halo(self) -> int:
        """Pixels read around each tile so that the tile's own windows are complete (none on
        the native grid, whose reads span whole windows of their own)."""
        return 0 if self.per_pixel or self.native else self.overlap // 2


class Weights(BaseModel):
    """A checkpoint in the model store, or none: then the network starts from `seed` and its
    outputs are good for throughput work only (no checkpoint = no meaning)."""

    #: file in the model store; None = no checkpoint (seeded init)
    file: str | None = None
    sha256: str = ""
    size: int | None = None
    #: where `tilefm models pull` fetches them from
    url: str = ""
    source: str = ""
    license: str = ""
    #: seed of the initial weights when there is no checkpoint
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> Weights:
        if self.file is None and self.seed is None:
            raise ValueError("weights need a file (with sha256 and url) or, for no checkpoint, a seed")
        if self.file is not None and not (self.sha256 and self.url):
            raise ValueError(f"weights file {self.file!r} needs its sha256 and url")
        return self

    @property
    def checkpoint(self) -> bool:
        return self.file is not None


Precision = Literal["fp32", "fp16", "bf16", "int8"]
BackendName = Literal["tensorrt", "torch-cuda", "onnxruntime", "torch"]


class ViTSpec(BaseModel):
    """Shape of a `vit` network (models/vit.py): DOFA-style wavelength-conditioned patch
    embedding and a ViT trunk. Defaults are DOFA v1's."""

    patch: int = 16
    #: DOFA v1 convolves its patches with padding 1 (kept so that its checkpoints mean the same)
    patch_padding: int = 1
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    #: width of the wavelength encoding and of the hypernetwork that turns it into patch weights
    wv_planes: int = 128
    #: per-patch embeddings in the output: `none` keeps them at patch stride (one output pixel
    #: per patch, the mosaic 2^log2(patch) zooms coarser: 256x fewer values than upsampled),
    #: `bilinear` / `nearest` upsample them onto the tile's pixels
    upsample: Literal["none", "bilinear", "nearest"] = "none"
    #: central wavelength (um) per "modality:band", overriding models/vit.py's WAVELENGTHS_UM
    wavelengths: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ViTSpec:
        if 256 % self.patch or self.dim % self.heads or self.dim % 4:
            raise ValueError("patch must divide 256, heads must divide dim, dim a multiple of 4")
        return self


class ModelCard(BaseModel):
    name: str
    title: str
    version: str
    architecture: Literal["presto", "onnx", "vit"]
    description: str = ""
    inputs: list[Input]
    output: Output
    context: Context = Field(default_factory=Context)
    weights: Weights
    backends: list[BackendName]
    #: precisions the model may run in (GPU backends); fp32 is the reference
    precisions: list[Precision] = Field(default_factory=lambda: list[Precision](["fp32"]))
    #: ground sampling distance the model was trained at, metres: a native-grid model runs on
    #: the scene's pixels coarsened by the largest whole factor that keeps them no larger than
    #: this, and a run warns (or with --strict refuses) when its inputs must be resampled further
    #: from it than `max_resample` times
    gsd_m: float | None = Field(None, gt=0)
    max_resample: float = Field(4.0, ge=1)
    #: acquisition dates the model takes at once: above 1, a scene may be a time series of up
    #: to this many dates (`tilefm.io.scene.Scene.series`); 1, one date. Only Presto reads series
    max_timesteps: int = Field(1, ge=1)
    #: network shape for `architecture: vit`
    vit: ViTSpec | None = None
    #: max abs difference to a reference allowed by `tilefm models verify`
    tolerance: float = 1e-4
    #: input/output tensor names for ONNX graphs
    onnx_input: str | None = None
    references: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        if self.architecture == "vit":
            if self.vit is None:
                raise ValueError("a vit card needs its `vit` section")
            if self.output.channels != self.vit.dim:
                raise ValueError(f"output.channels ({self.output.channels}) must be vit.dim ({self.vit.dim})")
        if self.max_timesteps > 1 and self.architecture != "presto":
            raise ValueError(
                f"architecture {self.architecture!r} reads one date (max_timesteps 1); only presto reads a "
                "time series"
            )
        if not self.weights.checkpoint and self.architecture != "vit":
            raise ValueError(f"architecture {self.architecture!r} needs a weights file")
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> ModelCard:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def input_for(self, modality: str) -> Input | None:
        return next((i for i in self.inputs if i.modality == modality), None)

    @property
    def output_stride(self) -> int:
        """Input pixels per output pixel along each axis: the patch for per-patch outputs, else 1."""
        if self.vit is not None and self.vit.upsample == "none":
            return self.vit.patch
        return 1
