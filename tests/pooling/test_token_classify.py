"""Token classification (*ForTokenClassification: NER-style taggers), vLLM's token_classify task: the class
probabilities of every prompt token equal transformers' softmax over its logits, for decoders (chunked prompts)
and BERT / RoBERTa, offline and through the server's /pooling."""

from __future__ import annotations

import httpx
import pytest
import torch

from pagellm import LLM, PoolingParams
from tests.entrypoints.server_utils import RemoteServer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be", "Paged attention stores keys."]


@torch.inference_mode()
def _hf_token_logits(path: str, texts: list[str]) -> list[torch.Tensor]:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return [model(**tok(t, return_tensors="pt")).logits[0].float() for t in texts]


@pytest.mark.parametrize("name", ["llama-tok", "qwen2-tok", "bert-tok", "roberta-tok"])
def test_token_probabilities_equal_transformers(pooling_models, name):
    path = pooling_models[name]
    decoder = not name.startswith(("bert", "roberta"))
    kw = {"max_num_batched_tokens": 4, "max_num_seqs": 2} if decoder else {}  # decoders: prompts in 4-token chunks
    llm = LLM(path, max_model_len=128, **kw)
    assert llm.llm_engine.config.model.pooler.task == "token_classify"
    outs = llm.encode(TEXTS, use_tqdm=False)
    ref = _hf_token_logits(path, TEXTS)
    for out, logits in zip(outs, ref):
        assert out.outputs.data.shape == logits.shape  # one row of class probabilities per prompt token
        assert torch.allclose(out.outputs.data, logits.softmax(-1), atol=1e-5)
    raw = llm.encode(TEXTS[:1], PoolingParams(use_activation=False), use_tqdm=False, pooling_task="token_classify")
    assert torch.allclose(raw[0].outputs.data, ref[0], atol=1e-4)
    if decoder:  # every position is needed: no prefix-cache hits, however often a prompt comes
        again = llm.encode(TEXTS[:1], use_tqdm=False)[0]
        assert again.num_cached_tokens == 0 and torch.equal(again.outputs.data, outs[0].outputs.data)
    with pytest.raises(ValueError, match="serves token_classify") as e:
        llm.embed(TEXTS[:1], use_tqdm=False)
    assert e.value.param == "task"
    with pytest.raises(ValueError, match="does not take normalize"):
        llm.encode(TEXTS[:1], PoolingParams(normalize=True), use_tqdm=False)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_token_classify_through_pooling_route(pooling_models):
    path = pooling_models["bert-tok"]
    ref = LLM(path, max_model_len=128).encode(TEXTS, use_tqdm=False)
    s = RemoteServer([path, "--served-model-name", "ner", "--max-model-len", "128"])
    try:
        r = httpx.post(s.url + "/pooling", json={"model": "ner", "input": TEXTS}).json()
        assert [d["index"] for d in r["data"]] == [0, 1, 2]
        for d, o in zip(r["data"], ref):
            assert torch.allclose(torch.tensor(d["data"]), o.outputs.data, atol=1e-6)
        explicit = httpx.post(s.url + "/pooling", json={"input": TEXTS[0], "task": "token_classify"}).json()
        assert explicit["data"][0]["data"] == r["data"][0]["data"]
        for route, body in (("/classify", {"input": "hi"}), ("/v1/embeddings", {"input": "hi"}),
                            ("/pooling", {"input": "hi", "task": "embed"})):
            resp = httpx.post(s.url + route, json=body)
            assert resp.status_code == 400, (route, resp.text)
    finally:
        s.stop()
