"""The models tilefm knows: one card per YAML file shipped in the package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tilefm.card import ModelCard
from tilefm.errors import ModelError

CARDS_DIR = Path(__file__).parent / "cards"


@lru_cache
def _cards() -> dict[str, ModelCard]:
    cards = {}
    for path in sorted(CARDS_DIR.glob("*.yaml")):
        card = ModelCard.from_yaml(path)
        if card.name in cards:
            raise RuntimeError(f"two cards named {card.name!r}")
        cards[card.name] = card
    return cards


def list_cards() -> list[ModelCard]:
    return list(_cards().values())


def get_card(name: str) -> ModelCard:
    try:
        return _cards()[name]
    except KeyError:
        known = ", ".join(sorted(_cards()))
        raise ModelError(f"unknown model {name!r} (known: {known})") from None
