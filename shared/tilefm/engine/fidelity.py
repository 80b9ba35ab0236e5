"""How close a run's inputs are to what its model was trained on: the grid the model sees, the
zoom a run defaults to, and what resampling the run would need.

A model card declares the ground sampling distance it was trained at (`gsd_m`) and how far from
it inputs may be taken (`max_resample`). Per-pixel models read on the output tiles; models with
spatial context read on the scene's own grid (`tilefm.io.native`). Either way the default zoom is the
coarsest whose pixels are no larger than the pixels the model sees, so the output keeps the
model's detail without inventing any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilefm.card import ModelCard
from tilefm.errors import TileFMError, ZoomError
from tilefm.grid import MAX_ZOOM, MIN_ZOOM, default_zoom, resolution
from tilefm.io.native import InferenceGrid
from tilefm.io.scene import Scene


class ResamplingError(TileFMError):
    """A run would resample its inputs further than the model card allows (with --strict)."""


@dataclass
class InputGrid:
    """What the model sees and why the run's zoom is what it is."""

    #: `tile` or `native`
    kind: str
    #: the native grid (`tilefm.io.native.InferenceGrid.describe`), or the tiles' pixels
    description: str
    #: ground size of the pixels the model sees, metres
    pixel_m: float
    zoom: int
    zoom_reason: str
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "grid": self.kind,
            "grid_description": self.description,
            "model_pixel_m": round(self.pixel_m, 3),
            "zoom_reason": self.zoom_reason,
            "warnings": self.warnings,
        }


def input_grid(scene: Scene, card: ModelCard, zoom: int | None, *, strict: bool = False) -> InputGrid:
    """The grid `card` sees on `scene`, the zoom (`zoom`, or the default with its reason) and the
    resampling warnings; with `strict`, a warning is a `ResamplingError` instead.

    Args:
        scene: the opened scene.
        card: the model's card.
        zoom: the zoom asked for, or None for the default.
        strict: refuse a run that resamples further than the card's `max_resample`.

    Returns:
        An `InputGrid`.
    """
    if zoom is not None and not (isinstance(zoom, int) and MIN_ZOOM <= zoom <= MAX_ZOOM):
        raise ZoomError(f"zoom {zoom} is outside {MIN_ZOOM}..{MAX_ZOOM}")
    latitude = scene.footprint.centroid.y
    cos = max(math.cos(math.radians(latitude)), 1e-6)
    if card.context.native:
        grid = InferenceGrid.of(scene, card)
        pixel_m = grid.ground_resolution_m() or scene.resolution_m
        kind, description = "native", grid.describe()
        seen = f"the model's input pixels ({pixel_m:g} m, {description})"
    else:
        pixel_m = scene.resolution_m
        kind, description = "tile", "web-mercator tiles"
        seen = f"the scene's finest pixels ({pixel_m:g} m)"
    if zoom is None:
        zoom = default_zoom(pixel_m, latitude)
        reason = (
            f"zoom {zoom} by default: the coarsest whose pixels ({resolution(zoom) * cos:.0f} m on the "
            f"ground) are no larger than {seen}"
        )
    else:
        reason = f"zoom {zoom} as asked ({resolution(zoom) * cos:.0f} m pixels on the ground)"
    warnings = []
    limit = card.max_resample
    if kind == "tile":
        tile_m = resolution(zoom) * cos
        pixel_m = tile_m
        if scene.resolution_m / tile_m > limit:
            warnings.append(
                f"zoom {zoom} upsamples the scene's {scene.resolution_m:g} m pixels "
                f"{scene.resolution_m / tile_m:.1f}x "
                f"onto {tile_m:.0f} m tiles (model {card.name!r} allows {limit:g}x); a lower --zoom keeps "
                "to the scene's detail"
            )
    if card.gsd_m:
        ratio = max(pixel_m / card.gsd_m, card.gsd_m / pixel_m)
        if ratio > limit:
            warnings.append(
                f"model {card.name!r} was trained on {card.gsd_m:g} m pixels and sees {pixel_m:.0f} m ones "
                "here "
                f"({ratio:.1f}x apart, more than the {limit:g}x its card allows): expect answers it was not "
                "trained to give"
            )
    if strict and warnings:
        raise ResamplingError(
            warnings[0] + " (refused: --strict)", field="zoom" if kind == "tile" else "scene"
        )
    return InputGrid(kind, description, pixel_m, zoom, reason, warnings)
