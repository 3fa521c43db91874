"""Shared fixtures: tiny checkpoints built once per session, HF reference helpers."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "tests", ".models")
DEMO_MODEL = os.path.join(ROOT, "pagellm", "assets", "shakespeare-llama")
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))

ARCHS = ["gpt2", "gpt_bigcode", "llama", "llama_tied_rope", "llama3", "qwen2", "qwen3", "mistral", "phi3", "gemma2",
         "gpt_neox", "opt", "opt_post_ln", "mixtral", "qwen2_moe", "gemma", "gemma3", "qwen3_moe", "granite",
         "starcoder2", "olmo2", "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite",
         "gpt_oss", "llama4", "granitemoehybrid", "bamba", "qwen3_next", "qwen3_5",
         "qwen3_5_moe", "nemotron_h", "lfm2",
         "falcon_h1", "falcon_h1_nonorm", "jamba", "mamba", "falcon_mamba", "mamba2", "gemma4", "gemma4_moe",
         "lfm2_moe", "olmo_hybrid", "olmo_hybrid_nope", "minimax", "minimax_m2", "kimi_linear", "bailing_hybrid",
         "deepseek_v32", "glm_moe_dsa"]
FALLBACK_ARCHS = ["stablelm", "ernie4_5_moe"]  # no native implementation: the transformers fallback


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, str]:
    from make_models import build

    return build(MODELS_DIR)


@pytest.fixture(scope="session")
def vlm_models() -> dict[str, str]:
    """Tiny vision-language checkpoints (tests/fixtures/multimodal_models.py)."""
    from multimodal_models import (
        build_gemma3,
        build_gemma4,
        build_llama4,
        build_llava,
        build_llava_next,
        build_mistral3,
        build_qwen2_vl,
        build_qwen3_5,
        build_qwen3_vl,
    )

    root = os.path.join(MODELS_DIR, "multimodal")
    return {
        # llava-1.5's choice: the second-to-last layer, the class token dropped
        "llava": build_llava(os.path.join(root, "llava")),
        # two feature layers concatenated, the class token kept
        "llava-full": build_llava(os.path.join(root, "llava-full"), strategy="full", feature_layer=[-2, -1]),
        # a SigLIP tower (no class token) and a Qwen2 language model with tied embeddings (LLaVA-Interleave-Qwen)
        "llava-siglip": build_llava(os.path.join(root, "llava-siglip"), strategy="full", feature_layer=-1,
                                    siglip=True),
        # anyres tiles (grids up to 2x2), a row-end newline feature: positions depend on the image's size
        "llava-next": build_llava_next(os.path.join(root, "llava-next")),
        "qwen2-vl": build_qwen2_vl(os.path.join(root, "qwen2-vl")),
        "qwen2.5-vl": build_qwen2_vl(os.path.join(root, "qwen2.5-vl"), v2_5=True),
        # Qwen3's decoder with interleaved M-RoPE and deepstack features, a vision transformer with learned positions
        "qwen3-vl": build_qwen3_vl(os.path.join(root, "qwen3-vl")),
        "qwen3-vl-moe": build_qwen3_vl(os.path.join(root, "qwen3-vl-moe"), moe=True),
        # SigLIP pooled to 4 positions per image, Gemma 3's decoder, bidirectional attention within an image
        "gemma3": build_gemma3(os.path.join(root, "gemma3")),
        # Pixtral: images at their own size, 2x2 patch merger, [IMG_BREAK] / [IMG_END] row ends
        "mistral3": build_mistral3(os.path.join(root, "mistral3")),
        # Llama 4's language model in a multimodal checkpoint: pagellm serves its text (tests/models/test_llama4.py)
        "llama4": build_llama4(os.path.join(root, "llama4")),
        # Qwen3.5 as it ships: the vision transformer and the hybrid decoder, dense and MoE (test_qwen2_vl.py)
        "qwen3_5": build_qwen3_5(os.path.join(root, "qwen3_5")),
        "qwen3_5_moe": build_qwen3_5(os.path.join(root, "qwen3_5_moe"), moe=True),
        # Gemma 4 with images: soft tokens per image from its size, both-ways attention in the sliding layers
        "gemma4": build_gemma4(os.path.join(root, "gemma4")),
    }


@pytest.fixture(scope="session")
def llama_path(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def gpt2_path(tiny_models) -> str:
    return tiny_models["gpt2"]
