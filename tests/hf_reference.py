"""Hugging Face transformers as the oracle: greedy continuations and their logprobs."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    # eager attention: the reference implementation. Some transformers releases (5.17 among them) default Gemma 2
    # to SDPA, which drops its attention logit soft-capping and so gives other tokens.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    return model


@torch.inference_mode()
def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from HF generate and the log-softmax of HF's logits at each chosen token."""
    return hf_greedy_with(hf_model(path), prompt_ids, max_new_tokens)


@torch.inference_mode()
def hf_greedy_with(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """hf_greedy for a model object (e.g. a PEFT model wrapping a transformers one)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, lps


@torch.inference_mode()
def hf_prompt_logprobs(path: str, prompt_ids: list[int]) -> list[float]:
    """logprob of prompt token i+1 given tokens 0..i, from one HF forward pass."""
    model = hf_model(path)
    logits = model(torch.tensor([prompt_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i, prompt_ids[i + 1]].item() for i in range(len(prompt_ids) - 1)]


def assert_text_only_matches(llm, hf, prompts: list[list[int]], params) -> None:
    """A multimodal checkpoint served for its language model: greedy tokens and logprobs equal `hf`'s (a transformers
    model object) on every prompt, and a prompt with an image is refused."""
    import pytest
    from PIL import Image

    hf.generation_config.eos_token_id = None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        tokens, lps = hf_greedy_with(hf, p, params.max_tokens)
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)
    with pytest.raises(ValueError, match="takes text only"):
        llm.generate({"prompt": "a picture", "multi_modal_data": {"image": Image.new("RGB", (28, 28))}}, params,
                     use_tqdm=False)
