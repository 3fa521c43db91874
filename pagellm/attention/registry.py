"""Attention backends by name, imported lazily (a compiled or GPU backend loads only when chosen)."""

from __future__ import annotations

import importlib
import logging

from pagellm.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

BACKENDS: dict[str, str] = {
    "torch_ref": "pagellm.attention.torch_ref:TorchRefBackend",
    "cpu_paged": "pagellm.attention.cpu_paged:CpuPagedBackend",
    "triton_paged": "pagellm.attention.triton_paged:TritonPagedBackend",
}


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    """`auto` picks the fastest backend that works on this device: the C++ kernel on CPU, Triton on CUDA."""
    if name == "auto":
        fast = "cpu_paged" if device == "cpu" else "triton_paged" if device.startswith("cuda") else None
        if fast is not None:
            try:
                return _make(fast)
            except Exception as e:  # no compiler, no Triton, ...: stay correct, just slower
                logger.warning("attention backend %s is unavailable (%s); using torch_ref", fast, e)
        return _make("torch_ref")
    return _make(name)


def _make(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {['auto', *BACKENDS]}, got {name!r}.")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
