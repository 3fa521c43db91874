"""Llama 4 against transformers: chunked attention wherever the engine cuts the work (blocks, prefill chunks, prefix
hits, either attention backend), and the language model of a Llama4ForConditionalGeneration checkpoint."""

from __future__ import annotations

import random

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.hf_reference import assert_text_only_matches, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)


def prompts(vocab: int, lengths=(3, 9, 23, 40), seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("backend", ["cpu_paged", "torch_ref"])
@pytest.mark.parametrize("block_size, batched", [(4, 13), (16, 7), (8, 2048)])
def test_chunked_attention_matches_hf_wherever_the_work_is_cut(tiny_models, backend, block_size, batched):
    """Attention chunks of 8 against cache blocks of 4 or 16, prefill chunks of 13 or 7 tokens (never aligned with
    the attention chunks), and a shared prefix served from the prefix cache."""
    path = tiny_models["llama4"]
    llm = LLM(path, block_size=block_size, num_gpu_blocks_override=512, max_num_batched_tokens=batched,
              max_num_seqs=4, attention_backend=backend)
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    shared = ps[3][:33]
    ps.append(shared + ps[1])  # after ps[3] is cached: its first blocks are prefix hits
    outs = llm.generate([{"prompt_token_ids": p} for p in ps[:4]], GREEDY, use_tqdm=False)
    outs += llm.generate([{"prompt_token_ids": ps[4]}], GREEDY, use_tqdm=False)
    assert outs[4].num_cached_tokens >= 32 - 32 % block_size
    for p, out in zip(ps, outs):
        tokens, lps = hf_greedy(path, p, GREEDY.max_tokens)
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)


def test_the_layers_differ_as_the_config_says(tiny_models):
    """Three chunked RoPE layers, then a NoPE one that sees the whole context; experts in layers 1 and 3, their router
    weight applied to their input."""
    llm = LLM(tiny_models["llama4"], num_gpu_blocks_override=32)
    layers = llm.llm_engine.executor.runner.model.model.layers
    assert [layer.self_attn.attn.params.attention_chunk_size for layer in layers] == [8, 8, 8, None]
    assert [layer.self_attn.use_rope for layer in layers] == [True, True, True, False]
    assert [layer.self_attn.temperature_tuning for layer in layers] == [False, False, False, True]
    assert [hasattr(layer.mlp, "experts") for layer in layers] == [False, True, False, True]
    assert layers[1].mlp.experts.apply_router_weight_on_input


def test_conditional_generation_checkpoint_serves_its_language_model(vlm_models):
    """A Llama4ForConditionalGeneration checkpoint: greedy tokens and logprobs equal those of transformers' language
    model loaded from it (what its forward runs for a text prompt; this transformers' forward itself fails on text
    alone); the vision weights stay unloaded; images are refused."""
    from transformers import Llama4ForConditionalGeneration

    path = vlm_models["llama4"]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256)
    assert llm.llm_engine.config.model.architecture == "Llama4ForConditionalGeneration"
    model = llm.llm_engine.executor.runner.model
    assert not any(n.startswith(("vision_model", "multi_modal_projector")) for n, _ in model.named_parameters())
    hf = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ps = prompts(llm.llm_engine.config.model.vocab_size, lengths=(1, 6, 17, 45))
    assert_text_only_matches(llm, hf.language_model, ps, GREEDY)
