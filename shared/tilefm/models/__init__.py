"""Model cards, the registry of known models, the weights store, and one module per architecture."""

from tilefm.card import ModelCard
from tilefm.models.registry import get_card, list_cards

__all__ = ["ModelCard", "get_card", "list_cards"]
