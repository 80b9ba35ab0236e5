"""`tilefm models verify`: compare a model with reference outputs of its official code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tilefm.errors import ModelError, ReferenceMismatch
from tilefm.models.registry import get_card
from tilefm.models.store import weights_path
from tilefm.settings import get_settings


def verify(name: str, reference: Path, *, tolerance: float | None = None) -> dict[str, Any]:
    card = get_card(name)
    reference = Path(reference)
    if not reference.is_file():
        raise ReferenceMismatch(f"{str(reference)!r} does not exist")
    try:
        with np.load(reference, allow_pickle=False) as z:
            keys = set(z.files)
    except (OSError, ValueError) as e:
        raise ReferenceMismatch(f"cannot read {str(reference)!r} as .npz: {e}") from None
    weights = weights_path(card, get_settings().model_store)
    if card.architecture == "presto":
        from tilefm.models.presto import load_presto, run_reference

        needed = {"x", "mask", "dynamic_world", "latlons", "month", "embedding"}
        if not needed <= keys:
            raise ReferenceMismatch(f"{str(reference)!r} lacks {', '.join(sorted(needed - keys))}")
        if weights is None:
            raise ModelError(f"model {name!r} has no checkpoint to check against {str(reference)!r}")
        result = run_reference(load_presto(weights), reference)
    else:
        raise ModelError(f"model {name!r} has no reference check (architecture {card.architecture!r})")
    tol = card.tolerance if tolerance is None else tolerance
    return {
        "model": name,
        "reference": str(reference),
        "max_abs_diff": float(result["max_abs_diff"]),
        "pixels": int(result["pixels"]),
        "tolerance": tol,
        "passed": bool(result["max_abs_diff"] <= tol),
    }
