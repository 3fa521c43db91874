"""Prompts given as embeddings (enable_prompt_embeds, vLLM's): against transformers' generate(inputs_embeds=...) on
the same checkpoint, in chunks, from the prefix cache (keyed by the embeddings), after preemption, under TP=2 and
through /v1/completions; the requests that cannot work refused with the field named."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.hf_reference import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
IDS = [[5, 17, 42, 99, 3, 200, 201], [7, 8, 9], list(range(30, 52))]


def embeds(path: str, seed: int = 0) -> list[torch.Tensor]:
    """The prompts' token embeddings, moved off the vocabulary's rows (so only embeddings reproduce them)."""
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [emb(torch.tensor(p)) + 0.3 * torch.randn(len(p), emb.weight.shape[1], generator=g) for p in IDS]


@torch.no_grad()
def hf_embeds_greedy(path: str, e: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = hf.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, len(e), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0].tolist()[-n:]
    return tokens, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]


def check(path: str, outs, es) -> None:
    for out, e in zip(outs, es):
        tokens, lps = hf_embeds_greedy(path, e, GREEDY.max_tokens)
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)


@pytest.mark.parametrize("arch, batched", [("llama", 2048), ("llama", 5), ("qwen3", 2048), ("granitemoehybrid", 5)])
def test_embeddings_equal_transformers(tiny_models, arch, batched):
    """Mixed with token-id prompts in one batch; chunks of 5; a hybrid (its recurrent layers read the embeddings)."""
    path = tiny_models[arch]
    es = embeds(path)
    llm = LLM(path, enable_prompt_embeds=True, num_gpu_blocks_override=128, block_size=4,
              max_num_batched_tokens=batched)
    outs = llm.generate([{"prompt_embeds": e} for e in es] + [{"prompt_token_ids": IDS[0]}], GREEDY, use_tqdm=False)
    check(path, outs[:3], es)
    assert list(outs[3].outputs[0].token_ids) == hf_greedy(path, IDS[0], GREEDY.max_tokens)[0]
    assert outs[0].prompt_token_ids == [0] * len(IDS[0]) and outs[0].prompt is None  # placeholders, no text
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.num_blocks


def test_prefix_cache_keys_the_embeddings_and_preemption_recomputes(tiny_models):
    path = tiny_models["llama"]
    es = embeds(path)
    llm = LLM(path, enable_prompt_embeds=True, num_gpu_blocks_override=128, block_size=4)
    first = llm.generate({"prompt_embeds": es[2]}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt_embeds": es[2]}, GREEDY, use_tqdm=False)[0]
    other = es[2].clone()
    other[10] += 1.0  # the same placeholder ids, another embedding at position 10: a hit of whole blocks before it
    moved = llm.generate({"prompt_embeds": other}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 20 and moved.num_cached_tokens == 8
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    check(path, [moved], [other])
    tight = LLM(path, enable_prompt_embeds=True, num_gpu_blocks_override=14, block_size=4,
                enable_prefix_caching=False)
    outs = tight.generate([{"prompt_embeds": e} for e in es] * 2, GREEDY, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    check(path, outs, es * 2)


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_tensor_and_pipeline_parallel(tiny_models, parallel):
    """Every tensor-parallel rank takes the embeddings; with stages only the first does (the others take its hidden
    states)."""
    path = tiny_models["llama"]
    es = embeds(path)
    with LLM(path, enable_prompt_embeds=True, **parallel, num_gpu_blocks_override=64) as llm:
        outs = llm.generate([{"prompt_embeds": e} for e in es], GREEDY, use_tqdm=False)
    check(path, outs, es)


def test_refusals(tiny_models, vlm_models):
    path = tiny_models["llama"]
    e = embeds(path)[0]
    plain = LLM(path, num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="enable_prompt_embeds") as err:
        plain.generate({"prompt_embeds": e}, GREEDY, use_tqdm=False)
    assert err.value.param == "prompt_embeds"
    llm = LLM(path, enable_prompt_embeds=True, num_gpu_blocks_override=32)
    for prompt, params, match in [
        ({"prompt_embeds": e[:, :10]}, GREEDY, "shape \\(tokens > 0, 64\\)"),
        ({"prompt_embeds": e[:0]}, GREEDY, "shape"),
        ({"prompt_embeds": e, "prompt_token_ids": [1, 2]}, GREEDY, "not both"),
        ({"prompt_embeds": e * float("nan")}, GREEDY, "inf or NaN"),
        ({"prompt_embeds": e}, SamplingParams(max_tokens=2, prompt_logprobs=1), "prompt_logprobs"),
        ({"prompt_embeds": e}, SamplingParams(max_tokens=2, repetition_penalty=1.2), "repetition_penalty")]:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, params, use_tqdm=False)
    assert len(llm.generate({"prompt_embeds": e}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 10
    with pytest.raises(ValueError, match="per-layer inputs|token ids beyond"):
        LLM(tiny_models["gemma4"], enable_prompt_embeds=True)
    with pytest.raises(ValueError, match="text-only generative"):
        LLM(vlm_models["qwen2-vl"], enable_prompt_embeds=True)


def test_server_completions_take_base64_embeddings(tiny_models):
    import httpx

    from tests.entrypoints.server_utils import RemoteServer

    path = tiny_models["llama"]
    es = embeds(path)

    def b64(t: torch.Tensor) -> str:
        buf = io.BytesIO()
        torch.save(t, buf)
        return base64.b64encode(buf.getvalue()).decode()

    server = RemoteServer([path, "--served-model-name", "m", "--enable-prompt-embeds", "--num-gpu-blocks-override",
                           "64"])
    try:
        body = {"model": "m", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        r = httpx.post(server.url + "/v1/completions", json={**body, "prompt_embeds": [b64(e) for e in es[:2]],
                                                               "prompt": "hello"}, timeout=60)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        from transformers import AutoTokenizer

        hello = len(AutoTokenizer.from_pretrained(path).encode("hello"))
        assert len(choices) == 3 and r.json()["usage"]["prompt_tokens"] == len(IDS[0]) + len(IDS[1]) + hello
        for c, e in zip(choices[:2], es[:2]):  # (the third is "hello")
            assert c["token_ids"] == hf_embeds_greedy(path, e, 10)[0]
        for extra, field in [({"prompt_embeds": "not base64!"}, "prompt_embeds"),
                             ({"prompt_embeds": b64(es[0][:, :3])}, "prompt_embeds"),
                             ({"prompt_embeds": b64(es[0]), "echo": True}, "echo")]:
            r = httpx.post(server.url + "/v1/completions", json={**body, **extra}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    finally:
        server.stop()
