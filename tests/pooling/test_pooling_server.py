"""The pooling routes of `pagellm serve` (vLLM's shapes), through the official openai client where OpenAI has the
route (/v1/embeddings), and the same numbers as the offline engine."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from pagellm import LLM
from tests.entrypoints.server_utils import RemoteServer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be", "Paged attention stores keys."]


@pytest.fixture(scope="module")
def embed_server(pooling_models):
    server = RemoteServer([pooling_models["llama-matryoshka"], "--served-model-name", "emb", "--max-model-len",
                           "128", "--max-num-batched-tokens", "32", "--scheduling-policy", "priority"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cross_server(pooling_models):
    server = RemoteServer([pooling_models["llama-cross"], "--max-model-len", "128"])
    yield server
    server.stop()


def test_embeddings_through_the_openai_client(embed_server, pooling_models):
    from openai import BadRequestError, OpenAI

    ref = LLM(pooling_models["llama-matryoshka"], max_model_len=128).embed(TEXTS, use_tqdm=False)
    client = OpenAI(base_url=embed_server.url + "/v1", api_key="x")
    resp = client.embeddings.create(model="emb", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in resp.data] == [0, 1, 2]
    for d, r in zip(resp.data, ref):
        assert d.embedding == pytest.approx(r.outputs.embedding, abs=1e-6)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(len(r.prompt_token_ids) for r in ref)
    floats = httpx.post(embed_server.url + "/v1/embeddings",
                        json={"model": "emb", "input": TEXTS[0], "encoding_format": "float"}).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    assert floats["data"][0]["embedding"] == pytest.approx(ref[0].outputs.embedding, abs=1e-6)
    b64 = httpx.post(embed_server.url + "/v1/embeddings",
                     json={"input": [[5, 6, 7]], "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(b64), dtype="<f4").shape == (64,)
    short = client.embeddings.create(model="emb", input=TEXTS[0], dimensions=16, encoding_format="float")
    assert len(short.data[0].embedding) == 16
    assert float(np.linalg.norm(short.data[0].embedding)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BadRequestError, match="dimensions must be <= 64"):
        client.embeddings.create(model="emb", input="hi", dimensions=100)
    with pytest.raises(BadRequestError, match="maximum context length is 128"):
        client.embeddings.create(model="emb", input=[1] * 200)
    with pytest.raises(BadRequestError, match="does not support the Completions API"):
        client.completions.create(model="emb", prompt="hi")
    r = httpx.post(embed_server.url + "/classify", json={"input": "hi"})
    assert r.status_code == 400 and "Classification API" in r.json()["error"]["message"]
    assert embed_server.wait_pool_free()


def test_generic_pooling_route(embed_server, pooling_models):
    """vLLM's /pooling: the raw output of any task the model serves, token embeddings included."""
    llm = LLM(pooling_models["llama-matryoshka"], max_model_len=128)
    ref = llm.encode(TEXTS[:2], pooling_task="token_embed", use_tqdm=False)
    r = httpx.post(embed_server.url + "/pooling", json={"input": TEXTS[:2], "task": "token_embed"}).json()
    assert [d["object"] for d in r["data"]] == ["pooling", "pooling"]
    for d, o in zip(r["data"], ref):
        assert np.allclose(d["data"], o.outputs.data.numpy(), atol=1e-6)
    pooled = httpx.post(embed_server.url + "/pooling", json={"input": TEXTS[0]}).json()["data"][0]["data"]
    emb = httpx.post(embed_server.url + "/v1/embeddings", json={"input": TEXTS[0]}).json()["data"][0]["embedding"]
    assert pooled == pytest.approx(emb, abs=1e-6)
    bad = httpx.post(embed_server.url + "/pooling", json={"input": "hi", "use_activation": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "use_activation"
    bad = httpx.post(embed_server.url + "/pooling", json={"input": "hi", "task": "classify"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "task"


def test_chat_embeddings(embed_server, pooling_models):
    """vLLM's chat embeddings: `messages` through the chat template (no generation prompt unless asked)."""
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "Good morrow"}, {"role": "assistant", "content": "And to you"}]
    tok = AutoTokenizer.from_pretrained(pooling_models["llama-matryoshka"])
    for gen in (False, True):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
        by_ids = httpx.post(embed_server.url + "/v1/embeddings", json={"input": [ids]}).json()["data"][0]
        r = httpx.post(embed_server.url + "/v1/embeddings", json={"messages": msgs, "add_generation_prompt": gen})
        assert r.status_code == 200 and r.json()["data"][0]["embedding"] == pytest.approx(by_ids["embedding"],
                                                                                           abs=1e-6)
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
    both = httpx.post(embed_server.url + "/v1/embeddings", json={"messages": msgs, "input": "x"})
    assert both.status_code == 400 and "either input or messages" in both.json()["error"]["message"]


def test_a_client_that_leaves_aborts_its_requests(embed_server):
    """A long embeddings request (600 distinct prompts of 120 tokens in 32-token steps, ~1.5 s here) whose client
    disconnects: every request is aborted and every KV block freed; the server keeps serving (a priority is
    taken, as in the other routes)."""
    body = {"input": [[(7 + i * 13 + j * 7) % 500 for j in range(120)] for i in range(600)], "priority": -1}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(embed_server.url + "/v1/embeddings", json=body, timeout=0.5)
    assert embed_server.wait_pool_free(timeout=30)
    assert embed_server.metric('pagellm:request_success_total{finished_reason="abort"}') > 0
    r = httpx.post(embed_server.url + "/v1/embeddings", json={"input": "still here", "priority": 3})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64


def test_embedding_scores(embed_server, pooling_models):
    r = httpx.post(embed_server.url + "/score", json={"text_1": TEXTS[0], "text_2": TEXTS[1:]}).json()
    emb = LLM(pooling_models["llama-matryoshka"], max_model_len=128).embed(TEXTS, use_tqdm=False)
    e = [np.array(o.outputs.embedding) for o in emb]
    assert [d["score"] for d in r["data"]] == pytest.approx([float(e[0] @ e[1]), float(e[0] @ e[2])], abs=1e-5)


def test_cross_encoder_routes(cross_server, pooling_models):
    llm = LLM(pooling_models["llama-cross"], max_model_len=128)
    ref = [o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:], use_tqdm=False)]
    score = httpx.post(cross_server.url + "/v1/score", json={"text_1": TEXTS[0], "text_2": TEXTS[1:]}).json()
    assert [d["score"] for d in score["data"]] == pytest.approx(ref, abs=1e-6)
    assert score["object"] == "list" and score["usage"]["prompt_tokens"] > 0
    rerank = httpx.post(cross_server.url + "/rerank",
                        json={"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 1}).json()
    best = int(np.argmax(ref))
    assert len(rerank["results"]) == 1
    assert rerank["results"][0]["index"] == best
    assert rerank["results"][0]["document"]["text"] == TEXTS[1 + best]
    assert rerank["results"][0]["relevance_score"] == pytest.approx(ref[best], abs=1e-6)
    cls = httpx.post(cross_server.url + "/classify", json={"input": TEXTS[:2]}).json()
    assert [d["num_classes"] for d in cls["data"]] == [1, 1] and cls["data"][0]["label"] == "class_0"
    assert cls["data"][0]["probs"] == pytest.approx(llm.classify(TEXTS[0], use_tqdm=False)[0].outputs.probs,
                                                    abs=1e-6)
    bad = httpx.post(cross_server.url + "/score", json={"text_1": TEXTS[:2], "text_2": TEXTS})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_1"
    bad = httpx.post(cross_server.url + "/v1/embeddings", json={"input": "hi"})
    assert bad.status_code == 400 and "Embeddings API" in bad.json()["error"]["message"]
    assert cross_server.metric('pagellm:request_success_total{finished_reason="stop"}') >= 5
    assert cross_server.wait_pool_free()


def test_bert_cross_encoder_reranks(pooling_models):
    from sentence_transformers import CrossEncoder

    path = pooling_models["bert-cross"]
    server = RemoteServer([path])
    try:
        docs = ["to be, or not to be", "paged attention stores keys", "the lazy dog"]
        r = httpx.post(server.url + "/v1/rerank", json={"query": "the quick brown fox", "documents": docs}).json()
        ref = CrossEncoder(path, device="cpu").predict([("the quick brown fox", d) for d in docs]).tolist()
        assert [x["index"] for x in r["results"]] == sorted(range(3), key=lambda i: -ref[i])
        assert [x["relevance_score"] for x in r["results"]] == pytest.approx(sorted(ref, reverse=True), abs=2e-5)
        assert r["usage"]["total_tokens"] > 0
    finally:
        server.stop()
