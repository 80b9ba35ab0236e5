"""The architectures tilefm runs, by the name a card gives (`architecture:`).

Why a registry of dotted paths rather than imports: the concrete models import torch or ONNX
Runtime, and what builds them (`tilefm.models.base`) sits below them; naming them here keeps
the imports one way (concrete modules import the base, never the reverse) and leaves a process
that only validates cards (the job API) without torch. Another package adds an architecture
with `register_architecture`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from tilefm.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """Where an architecture's classes live, as "module:Class"."""

    #: its `TileModel`, built as Class(card, backend, weights, *, threads, precision, out_dtype)
    model: str
    #: its `InputPreparer`, built as Class(card); None: the tiles as read
    inputs: str | None = None
    #: whether it needs a weights file (a seeded initialisation serves throughput work)
    needs_weights: bool = True


_ARCHITECTURES: dict[str, Architecture] = {
    "onnx": Architecture("tilefm.models.onnx:OnnxWindowModel"),
    "presto": Architecture(
        "tilefm.models.presto_tiles:PrestoTileModel", "tilefm.models.presto_tiles:PrestoInputs"
    ),
    "vit": Architecture(
        "tilefm.models.vit_tiles:ViTTileModel", "tilefm.models.vit_tiles:ViTInputs", needs_weights=False
    ),
}


def register_architecture(name: str, architecture: Architecture) -> None:
    """Make `name` runnable (a card's `architecture:`), replacing any entry of that name."""
    _ARCHITECTURES[name] = architecture


def architecture(name: str) -> Architecture:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise ModelError(f"no runner for architecture {name!r} (known: {known})", field="model") from None


def resolve(path: str) -> Any:
    """The object a "module:name" path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
