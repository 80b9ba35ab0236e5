"""A model's calibration set made from a real scene (`tilefm models calibrate`): tiles read and
prepared as the model takes them. The set itself, and the int8 graph TensorRT builds from it,
are the backends' (`tilefm.backends.calibration`); reading scenes is not."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tilefm.backends.calibration import Calibration, calibration_path, card_bands, weights_id
from tilefm.card import ModelCard
from tilefm.errors import BackendError
from tilefm.grid import default_zoom, plan_tiles
from tilefm.io.read import check_scene, read_tiles
from tilefm.io.scene import open_scene
from tilefm.models.registry import get_card
from tilefm.models.vit_tiles import ViTInputs
from tilefm.settings import get_settings

log = logging.getLogger(__name__)

#: tiles in a calibration set by default: a few dozen spread over the scene (min/max ranges)
DEFAULT_TILES = 32
#: tiles read per batch while looking for complete ones
BATCH = 4


def make_calibration(card: ModelCard, scene: Any, plan: Any, tiles: int = DEFAULT_TILES) -> Calibration:
    """`tiles` real tiles spread evenly over the plan, read and prepared as the model takes them
    (normalised, gaps at 0), keeping those where every band of the scene's modalities has data."""
    if card.architecture != "vit" or "int8" not in card.precisions:
        raise BackendError(
            f"calibration sets are for int8 ViT engines; {card.name!r} does not run in int8", field="model"
        )
    if tiles < 1:
        raise BackendError(f"a calibration set needs at least 1 tile, not {tiles}", field="tiles")
    prep = ViTInputs(card)  # int8 is for ViT engines only (checked above)
    want = tuple(i for i, name in enumerate(card_bands(card)) if name.split(":")[0] in scene.modalities)
    picks = np.unique(
        np.linspace(0, len(plan.tiles) - 1, min(len(plan.tiles), 4 * tiles)).round().astype(int)
    )
    kept: list[np.ndarray] = []
    for start in range(0, len(picks), 4 * BATCH):
        batch = [plan.tiles[i] for i in picks[start : start + 4 * BATCH]]
        for t in read_tiles(scene, card, batch, 0):
            bands, x, valid = prep.tile(t)
            if bands.indices == want and valid.mean() > 0.99:
                kept.append(x.astype(np.float16))
    if not kept:
        raise BackendError(
            f"no tile of the scene has data in all {len(want)} bands of its modalities: nothing to "
            "calibrate on",
            field="scene",
        )
    # evenly over what was kept, so that the set spans the scene
    chosen = [
        kept[i] for i in np.unique(np.linspace(0, len(kept) - 1, min(tiles, len(kept))).round().astype(int))
    ]
    source = json.dumps({"scene": scene.describe(), "zoom": plan.zoom, "tiles": len(chosen)}, sort_keys=True)
    return Calibration(np.stack(chosen), want, card_bands(card), weights_id(card), source)


def calibrate(
    model: str,
    sources: dict[str, str | list[str]],
    *,
    zoom: int | None = None,
    tiles: int = DEFAULT_TILES,
    store: Path | None = None,
    date: Any = None,
) -> Path:
    """Make `model`'s calibration set from a scene and put it in the model store."""
    card = get_card(model)
    scene = open_scene(sources, date_override=date)
    check_scene(scene, card)
    if zoom is None:
        zoom = default_zoom(scene.resolution_m, scene.footprint.centroid.y)
    plan = plan_tiles(scene.footprint, zoom)
    cal = make_calibration(card, scene, plan, tiles)
    path = calibration_path(card, store or get_settings().model_store, list(scene.modalities))
    cal.save(path)
    log.info("%s: calibration set of %d tiles at %s", card.name, len(cal.x), path)
    return path
