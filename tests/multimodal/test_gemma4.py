"""Gemma 4 with images (Gemma4ForConditionalGeneration) through pagellm against transformers on the same checkpoint:
images resized to their own aspect ratio and a soft token per pooled patch group (Gemma 4's processor), the per-layer
inputs with the pad token at image positions, the image positions attending to each other both ways in the sliding
layers only; chunked prefill (a chunk never ends inside an image), prefix-cache hits, preemption, async scheduling
and TP=2; text-only prompts too."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM
from tests.multimodal import checks

P = "<image_soft_token>"
PROMPTS = checks.prompts_with(P)


def test_greedy_equals_transformers(vlm_models):
    checks.greedy_equals_hf(vlm_models["gemma4"], PROMPTS, max_model_len=512)


@pytest.mark.parametrize("everywhere", [False, True])
def test_images_attend_both_ways_in_the_sliding_layers_only(vlm_models, monkeypatch, everywhere):
    """Causal attention for the images (no second pass over their rows), or the second pass in the global layers
    too: either way the logprobs part from transformers'."""
    import pagellm.models.layers as layers
    from pagellm.models.gemma4 import Gemma4ForConditionalGeneration

    if everywhere:
        init = Gemma4ForConditionalGeneration.__init__

        def all_layers(self, *a, **kw):
            init(self, *a, **kw)
            for layer in self.language_model.model.layers:
                layer.self_attn.attn.image_blocks = True

        monkeypatch.setattr(Gemma4ForConditionalGeneration, "__init__", all_layers)
    else:
        monkeypatch.setattr(layers, "image_block_attention", lambda *a: None)
    llm = LLM(vlm_models["gemma4"], max_model_len=512)
    outs = llm.generate(PROMPTS[:1], checks.greedy(), use_tqdm=False)
    with pytest.raises(AssertionError):
        checks.against_hf(vlm_models["gemma4"], PROMPTS[:1], outs)


def test_prompt_equals_gemma4_processor(vlm_models):
    """Each image token becomes <start_of_image>, one soft token per feature, <end_of_image> (Gemma4Processor's
    text; built here without its audio and video parts, whose video processor needs torchvision); the images fill
    the soft tokens, whole; a prompt that comes expanded is taken as is."""
    from unittest import mock

    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    path = vlm_models["gemma4"]
    llm = LLM(path, max_model_len=512)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a, **k: None):
        proc = Gemma4Processor(None, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                               None)
    p = PROMPTS[1]
    ref = proc(text=p["prompt"], images=p["multi_modal_data"]["image"], return_tensors="pt")
    ours = llm.llm_engine.input_processor.process(p, checks.greedy())
    assert ours.prompt_token_ids == ref["input_ids"][0].tolist()
    soft = (ref["mm_token_type_ids"][0] == 1).nonzero().flatten().tolist()
    assert [i for f in ours.mm_features for i in range(f.offset, f.end)] == soft
    assert all(f.whole for f in ours.mm_features) and len({f.length for f in ours.mm_features}) > 1
    again = llm.llm_engine.input_processor.process({"prompt_token_ids": ours.prompt_token_ids,
                                                    "multi_modal_data": p["multi_modal_data"]}, checks.greedy())
    assert again.prompt_token_ids == ours.prompt_token_ids


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunks_prefix_hits_and_preemption(vlm_models, async_scheduling):
    """Chunks of 72 tokens: a chunk that would end inside an image (up to 70 positions) stops before it."""
    checks.chunks_prefix_hits_and_preemption(vlm_models["gemma4"], PROMPTS, chunk=72, blocks=64, max_model_len=512,
                                            async_scheduling=async_scheduling)


def test_tensor_parallel_equals_transformers(vlm_models):
    checks.tensor_parallel(vlm_models["gemma4"], PROMPTS, max_model_len=512)


def test_text_prompts_in_small_chunks(vlm_models):
    """Text-only prompts in chunks of 16 equal transformers' whole model (the per-layer inputs from the tokens)."""
    import transformers as tf

    from tests.hf_reference import hf_greedy_with
    from tests.models.test_hybrid import GREEDY, prompts

    path = vlm_models["gemma4"]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, max_num_batched_tokens=16)
    hf = tf.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    ps = prompts(512, lengths=(3, 20, 37))
    for p, out in zip(ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False)):
        tokens, lps = hf_greedy_with(hf, p, GREEDY.max_tokens)
        assert list(out.outputs[0].token_ids) == tokens
        got = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        assert got == pytest.approx(lps, abs=2e-4)


def test_an_image_larger_than_a_step_is_refused(vlm_models):
    """An image computed in one step cannot exceed max_num_batched_tokens: a clear error, and the engine serves
    the next request."""
    llm = LLM(vlm_models["gemma4"], max_model_len=512, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        llm.generate(PROMPTS[0], checks.greedy(), use_tqdm=False)
    assert len(llm.generate(PROMPTS[3], checks.greedy(), use_tqdm=False)[0].outputs[0].token_ids) == checks.N
