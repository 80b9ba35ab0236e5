"""Inference backends behind one interface. A backend turns a model file or module into a callable
on numpy arrays; which one runs is chosen per worker (`auto` takes the first the card lists that
is installed). TensorRT and CUDA backends plug in here."""

from __future__ import annotations

import importlib.util

from tilefm.errors import BackendError
from tilefm.models.card import ModelCard

#: backends tilefm knows, in order of preference for `auto`
KNOWN = ("tensorrt", "torch", "onnxruntime")
_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


def select_backend(card: ModelCard, requested: str = "auto") -> str:
    """The backend to run `card` with, or a BackendError that says what to do instead."""
    if requested == "auto":
        for name in card.backends:
            if is_installed(name):
                return name
        raise BackendError(f"no backend for model {card.name!r} is installed (it runs on: {', '.join(card.backends)})")
    if requested not in KNOWN:
        raise BackendError(f"unknown backend {requested!r} (choose auto, {', '.join(KNOWN)})")
    if requested not in card.backends:
        raise BackendError(f"model {card.name!r} cannot run on {requested!r}; it runs on: {', '.join(card.backends)}")
    if not is_installed(requested):
        raise BackendError(f"backend {requested!r} is not installed (pip install tilefm[{requested}])")
    return requested
