"""Mistral 3 (Pixtral vision encoder) through pagellm against transformers' Mistral3ForConditionalGeneration on the
same checkpoint: each image a grid of [IMG] rows ended by [IMG_BREAK] / [IMG_END] (PixtralProcessor's layout), the
features at the [IMG] positions only; greedy tokens and logprobs equal over mixed batches, chunked prefill, prefix-cache
hits, preemption, emulated CUDA graphs, TP=2 and chat."""

from __future__ import annotations

from pagellm import LLM
from tests.multimodal import checks

PROMPTS = checks.prompts_with("[IMG]")


def test_greedy_equals_transformers(vlm_models):
    checks.greedy_equals_hf(vlm_models["mistral3"], PROMPTS, max_model_len=512)


def test_prompt_layout_equals_pixtral_processor(vlm_models):
    """PixtralProcessor's replace_image_token: per row of merged patches, width x [IMG] and [IMG_BREAK], the last
    [IMG_BREAK] made [IMG_END], for the size the image processor resized the image to; a prompt that comes
    expanded is taken as is."""
    from transformers import AutoImageProcessor

    path = vlm_models["mistral3"]
    llm = LLM(path, max_model_len=512)
    tok = llm.get_tokenizer()
    proc = AutoImageProcessor.from_pretrained(path, patch_size={"height": 14, "width": 14})
    p = PROMPTS[1]
    ours = llm.llm_engine.input_processor.process(p, checks.greedy())
    parts = p["prompt"].split("[IMG]")
    text = parts[0]
    for img, rest in zip(p["multi_modal_data"]["image"], parts[1:]):
        h, w = (int(x) // 14 for x in proc(images=[img], return_tensors="pt")["image_sizes"][0])
        grid = (["[IMG]"] * w + ["[IMG_BREAK]"]) * h
        grid[-1] = "[IMG_END]"
        text += "".join(grid) + rest
    assert ours.prompt_token_ids == tok.encode(text)
    first = llm.llm_engine.input_processor.process(PROMPTS[0], checks.greedy())
    assert first.mm_features[0].length != ours.mm_features[0].length  # images of other sizes, grids of other shapes
    again = llm.llm_engine.input_processor.process({"prompt_token_ids": ours.prompt_token_ids,
                                                    "multi_modal_data": p["multi_modal_data"]}, checks.greedy())
    assert again.prompt_token_ids == ours.prompt_token_ids
    assert [(f.offset, f.length) for f in again.mm_features] == [(f.offset, f.length) for f in ours.mm_features]


def test_chunks_prefix_hits_and_preemption(vlm_models):
    checks.chunks_prefix_hits_and_preemption(vlm_models["mistral3"], PROMPTS, chunk=8, blocks=20, max_model_len=512)


def test_emulated_cuda_graphs(vlm_models, monkeypatch):
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    checks.emulated_graphs(vlm_models["mistral3"], PROMPTS)


def test_tensor_parallel_equals_transformers(vlm_models):
    checks.tensor_parallel(vlm_models["mistral3"], PROMPTS, max_model_len=512)


def test_chat(vlm_models):
    _, text = checks.chat_with_an_image(vlm_models["mistral3"])
    assert text.startswith("<|user|>[IMG]") and "[IMG_END]hi<|end|>" in text
