"""Hugging Face architecture name -> pagellm model class, imported lazily."""

from __future__ import annotations

import importlib

MODELS: dict[str, str] = {
    "GPT2LMHeadModel": "pagellm.models.gpt2:GPT2LMHeadModel",
    "GPTBigCodeForCausalLM": "pagellm.models.gpt_bigcode:GPTBigCodeForCausalLM",
    "LlamaForCausalLM": "pagellm.models.llama:LlamaForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(MODELS)


def resolve_architecture(architectures: list[str] | None) -> str:
    """The first architecture of config.json that pagellm serves; ValueError naming the supported ones otherwise."""
    for arch in architectures or []:
        if arch in MODELS:
            return arch
    raise ValueError(f"model architecture {architectures} is not supported; supported architectures: "
                     f"{', '.join(supported_architectures())}.")


def get_model_class(architecture: str):
    module, cls = MODELS[resolve_architecture([architecture])].split(":")
    return getattr(importlib.import_module(module), cls)
