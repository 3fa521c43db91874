"""Gemma 3 with images (Gemma3ForConditionalGeneration) through pagellm against transformers on the same checkpoint:
the prompt Gemma 3's processor writes, greedy tokens equal and logprobs close with the image positions attending to
each other both ways (transformers' token_type_ids mask), over chunked prefill (a chunk never ends inside an image),
prefix-cache hits, preemption, async scheduling, emulated CUDA graphs and TP=2; text-only prompts too."""

from __future__ import annotations

import pytest

from pagellm import LLM
from tests.multimodal import checks

P = "<start_of_image>"
PROMPTS = checks.prompts_with(P)


def test_greedy_equals_transformers(vlm_models):
    checks.greedy_equals_hf(vlm_models["gemma3"], PROMPTS)


def test_images_attend_to_themselves_both_ways(vlm_models, monkeypatch):
    """Without the second pass over an image's rows (causal attention only), the logprobs part from transformers':
    the bidirectional mask is what the equality above rests on."""
    import pagellm.models.layers as layers

    monkeypatch.setattr(layers, "image_block_attention", lambda *a: None)
    llm = LLM(vlm_models["gemma3"], max_model_len=256)
    outs = llm.generate(PROMPTS[:1], checks.greedy(), use_tqdm=False)
    with pytest.raises(AssertionError):
        checks.against_hf(vlm_models["gemma3"], PROMPTS[:1], outs)


def test_prompt_equals_gemma3_processor(vlm_models):
    """<start_of_image> becomes "\\n\\n<start_of_image>", 4 soft tokens, "<end_of_image>\\n\\n" (Gemma3Processor's
    text); a prompt that comes expanded is taken as is."""
    from transformers import AutoProcessor

    path = vlm_models["gemma3"]
    llm = LLM(path, max_model_len=256)
    proc = AutoProcessor.from_pretrained(path)
    p = PROMPTS[1]
    ref = proc(text=p["prompt"], images=p["multi_modal_data"]["image"], return_tensors="pt")
    ours = llm.llm_engine.input_processor.process(p, checks.greedy())
    assert ours.prompt_token_ids == ref["input_ids"][0].tolist()
    soft = (ref["token_type_ids"][0] == 1).nonzero().flatten().tolist()
    assert [i for f in ours.mm_features for i in range(f.offset, f.end)] == soft
    assert all(f.whole for f in ours.mm_features)
    again = llm.llm_engine.input_processor.process({"prompt_token_ids": ours.prompt_token_ids,
                                                    "multi_modal_data": p["multi_modal_data"]}, checks.greedy())
    assert again.prompt_token_ids == ours.prompt_token_ids
    assert [(f.offset, f.length) for f in again.mm_features] == [(f.offset, f.length) for f in ours.mm_features]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunks_prefix_hits_and_preemption(vlm_models, async_scheduling):
    """Chunks of 6 tokens: a chunk that would end inside an image stops before it, and the image (4 positions) is
    computed whole in the next step, with its later keys."""
    checks.chunks_prefix_hits_and_preemption(vlm_models["gemma3"], PROMPTS, chunk=6, blocks=24,
                                            async_scheduling=async_scheduling)


def test_a_chunk_never_ends_inside_an_image():
    from pagellm.core.scheduler import _cut_before_whole_image
    from pagellm.multimodal.inputs import MultiModalFeature

    class Req:
        mm_features = [MultiModalFeature("image", "a", 10, 4, whole=True), MultiModalFeature("image", "b", 20, 4)]

    assert _cut_before_whole_image(Req, 0, 12) == 10  # would end inside [10, 14): stops at 10
    assert _cut_before_whole_image(Req, 10, 2) == 0  # starts at it without room for it: waits
    assert _cut_before_whole_image(Req, 0, 14) == 14  # ends with it
    assert _cut_before_whole_image(Req, 12, 6) == 6  # a cache hit ended inside it: the rest fits whole
    assert _cut_before_whole_image(Req, 14, 8) == 8  # an image that is not "whole" may be split


def test_emulated_cuda_graphs(vlm_models, monkeypatch):
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    checks.emulated_graphs(vlm_models["gemma3"], PROMPTS)


def test_tensor_parallel_equals_transformers(vlm_models):
    checks.tensor_parallel(vlm_models["gemma3"], PROMPTS)


def test_chat_and_limits(vlm_models):
    _, text = checks.chat_with_an_image(vlm_models["gemma3"])
    assert text.startswith("<start_of_turn>user\n\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>")
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(3\) must be >= 4"):
        LLM(vlm_models["gemma3"], max_model_len=256, max_num_batched_tokens=3)
