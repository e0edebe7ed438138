"""The model families, one plain file each, and the one registry that maps config.json's `family` to a class."""
from __future__ import annotations

from .llama import Llama, LlamaConfig
from .opt import OPT, OPTConfig

FAMILIES = {"llama": Llama, "opt": OPT}


def model_class(family: str):
    """The model class of a config.json `family` value."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family]


__all__ = ["FAMILIES", "Llama", "LlamaConfig", "OPT", "OPTConfig", "model_class"]
