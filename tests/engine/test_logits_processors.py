"""Custom logits processors (vLLM's programming model): per-request settings through extra_args, the batch's changes
(added / removed requests, preemption included) and the live output lists, checked against transformers' generate
with the same rule as a transformers LogitsProcessor; raw and processed logprobs; TP=2; the server's vllm_xargs;
refusals."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.engine.lp_ext import BanPrompt, NoRepeat, TargetToken
from tests.hf_reference import hf_greedy, hf_model

PROMPTS = [[5, 17, 42, 99, 3, 200, 201, 7], [7, 8, 9], list(range(30, 52)), [11, 12, 13, 14, 11, 12]]


def greedy(n: int = 12, logprobs: int | None = None, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs, extra_args=extra or None)


def hf_with(path: str, prompt: list[int], n: int, rule) -> list[int]:
    """transformers' greedy tokens with `rule(prompt_len, input_ids, scores) -> scores` as a logits processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Rule(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return rule(len(prompt), input_ids, scores)

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      logits_processor=LogitsProcessorList([Rule()]), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def no_repeat(prompt_len, input_ids, scores):
    scores = scores.clone()
    scores[0, input_ids[0, prompt_len:]] = float("-inf")
    return scores


def ban_prompt(prompt_len, input_ids, scores):
    scores = scores.clone()
    scores[0, input_ids[0, :prompt_len]] = float("-inf")
    return scores


def test_target_token_rows_only_and_where_logprobs_are_taken(llama_path):
    llm = LLM(llama_path, logits_processors=[TargetToken], max_model_len=128, num_gpu_blocks_override=64)
    params = [greedy(logprobs=0, target_token=77), greedy(logprobs=0), greedy(logprobs=0, target_token=3),
              greedy(logprobs=0)]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [77] * 12 and outs[2].outputs[0].token_ids == [3] * 12
    for i in (1, 3):  # the other rows are untouched
        tokens, lps = hf_greedy(llama_path, PROMPTS[i], 12)
        got = outs[i].outputs[0]
        assert got.token_ids == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, tokens)] == pytest.approx(lps, abs=2e-4)
    # raw logprobs (the default) are taken before the processors, processed ones after them (as vLLM)
    raw = outs[0].outputs[0].logprobs[0][77].logprob
    assert raw < -1.0
    processed = llm.generate({"prompt_token_ids": PROMPTS[0]},
                             SamplingParams(temperature=0, max_tokens=2, logprobs=0, logprobs_mode="processed_logprobs",
                                            extra_args={"target_token": 77}), use_tqdm=False)[0]
    assert processed.outputs[0].logprobs[0][77].logprob == 0.0
    with pytest.raises(ValueError, match="target_token must be a token id"):
        llm.generate({"prompt_token_ids": [1, 2]}, greedy(target_token="x"), use_tqdm=False)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_live_outputs_and_preemption_against_transformers(llama_path):
    """NoRepeat reads each request's output list as it grows; a KV cache too small for the batch preempts requests
    (they leave the batch and come back as added, with their outputs so far). By name, as the server loads it."""
    llm = LLM(llama_path, logits_processors=["tests.engine.lp_ext:NoRepeat", "tests.engine.lp_ext.BanPrompt"],
              max_model_len=128, num_gpu_blocks_override=9, block_size=8, max_num_seqs=4)
    prompts = PROMPTS * 2
    params = [greedy(24, no_repeat=True), greedy(24, ban_prompt=True), greedy(24, no_repeat=True, ban_prompt=True),
              greedy(24)] * 2
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    for p, sp, out in zip(prompts, params, outs):
        extra = sp.extra_args or {}
        rules = [r for key, r in (("no_repeat", no_repeat), ("ban_prompt", ban_prompt)) if extra.get(key)]

        def both(plen, ids, scores, rules=rules):
            for r in rules:
                scores = r(plen, ids, scores)
            return scores

        assert out.outputs[0].token_ids == hf_with(llama_path, p, 24, both)
        if extra.get("no_repeat"):
            assert len(set(out.outputs[0].token_ids)) == 24


def test_tensor_parallel_and_a_class_without_an_importable_name(llama_path):
    """TP=2: the processors run on the rank that samples; a class defined in a function crosses by value."""

    class EvenOnly(TargetToken):  # a local class: no module.Class name
        def apply(self, logits):
            for index in self.targets:
                logits[index, 1::2] = float("-inf")
            return logits

    llm = LLM(llama_path, logits_processors=[EvenOnly, NoRepeat], tensor_parallel_size=2, max_model_len=128,
              num_gpu_blocks_override=64)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            [greedy(target_token=1, no_repeat=True), greedy()] * 2, use_tqdm=False)

        def even_no_repeat(plen, ids, scores):
            scores = no_repeat(plen, ids, scores)
            scores[0, 1::2] = float("-inf")
            return scores

        for i, out in enumerate(outs):
            want = hf_with(llama_path, PROMPTS[i], 12, even_no_repeat) if i % 2 == 0 else \
                hf_greedy(llama_path, PROMPTS[i], 12)[0]
            assert out.outputs[0].token_ids == want
    finally:
        llm.shutdown()


def test_refusals(llama_path):
    with pytest.raises(ValueError, match="cannot be imported"):
        LLM(llama_path, logits_processors=["tests.engine.lp_ext:Nowhere"])
    with pytest.raises(ValueError, match="must be a class with apply"):
        LLM(llama_path, logits_processors=[len])
    with pytest.raises(ValueError, match="speculative decoding"):
        LLM(llama_path, logits_processors=[TargetToken],
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLM(llama_path, logits_processors=[TargetToken], num_scheduler_steps=4)
    with pytest.raises(ValueError, match="async_scheduling off"):
        LLM(llama_path, logits_processors=[TargetToken], async_scheduling=True)
    with pytest.raises(ValueError, match="pooling model"):
        LLM(llama_path, runner="pooling", logits_processors=[BanPrompt])


def test_server_vllm_xargs(llama_path):
    import httpx

    from tests.entrypoints.server_utils import RemoteServer

    server = RemoteServer([llama_path, "--logits-processors", "tests.engine.lp_ext.TargetToken",
                           "--num-gpu-blocks-override", "64", "--max-model-len", "128"])
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "return_token_ids": True}
        r = httpx.post(server.url + "/v1/completions", json={**body, "vllm_xargs": {"target_token": 9}}, timeout=60)
        assert r.json()["choices"][0]["token_ids"] == [9] * 6
        plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
        assert plain == hf_greedy(llama_path, PROMPTS[0], 6)[0]
        bad = httpx.post(server.url + "/v1/completions", json={**body, "vllm_xargs": {"target_token": -1}})
        assert bad.status_code == 400 and "target_token" in bad.json()["error"]["message"]
        chat = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "vllm_xargs": {"target_token": 9},
            "return_token_ids": True})
        assert chat.json()["choices"][0]["token_ids"] == [9] * 3
    finally:
        server.stop()
