"""LLaVA-NeXT (anyres) through pagellm against transformers' LlavaNextForConditionalGeneration on the same checkpoint:
images of different sizes fill different numbers of positions (LlavaNextProcessor's count), and greedy tokens and
logprobs equal transformers' over mixed batches, chunked prefill, prefix-cache hits, preemption and TP=2."""

from __future__ import annotations

import pytest

from pagellm import LLM
from tests.multimodal import checks

# checks.IMGS: 40x24, 36x32, 32x40, 28x48 (width x height): wide and tall, different grids and crops
PROMPTS = checks.prompts_with("<image>")


def test_greedy_equals_transformers(vlm_models):
    checks.greedy_equals_hf(vlm_models["llava-next"], PROMPTS, max_model_len=512)


def test_positions_per_image_equal_the_processor(vlm_models):
    """LlavaNextProcessor (as llava-hf configures it: the class token counted, then dropped) writes the same
    prompt, and images of other sizes fill other numbers of positions."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaNextProcessor

    path = vlm_models["llava-next"]
    llm = LLM(path, max_model_len=512)
    proc = LlavaNextProcessor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                              patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    lengths = set()
    for p in PROMPTS[:3]:
        ours = llm.llm_engine.input_processor.process(p, checks.greedy())
        imgs = p["multi_modal_data"]["image"]
        ref = proc(text=p["prompt"], images=imgs if isinstance(imgs, list) else [imgs], return_tensors="pt")
        assert ours.prompt_token_ids == ref["input_ids"][0].tolist()
        lengths |= {f.length for f in ours.mm_features}
    assert len(lengths) >= 3


def test_chunks_prefix_hits_and_preemption(vlm_models):
    checks.chunks_prefix_hits_and_preemption(vlm_models["llava-next"], PROMPTS, chunk=16, blocks=48, block_size=8,
                                            max_model_len=512, max_tokens=40)


def test_tensor_parallel_equals_transformers(vlm_models):
    checks.tensor_parallel(vlm_models["llava-next"], PROMPTS, max_model_len=512)


def test_full_strategy_is_refused(vlm_models, tmp_path):
    import json
    import shutil

    path = str(tmp_path / "full")
    shutil.copytree(vlm_models["llava-next"], path)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["vision_feature_select_strategy"] = "full"
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="must drop the class token"):
        LLM(path, max_model_len=512)
