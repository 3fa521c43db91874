"""Attention backends by name, imported lazily (a compiled or GPU backend loads only when chosen)."""

from __future__ import annotations

import importlib
import logging

from pagellm.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "torch_ref": "pagellm.attention.torch_ref:TorchRefBackend",
}


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    """`auto` picks the fastest backend that works on this device."""
    if name == "auto":
        name = "torch_ref"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {['auto', *BACKENDS]}, got {name!r}.")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
