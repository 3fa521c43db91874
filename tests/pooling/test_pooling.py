"""Pooling models against transformers (and sentence-transformers) on the same checkpoints: embeddings,
classification, scores, token embeddings; chunked prefill, prefix caching, preemption, aborts, bad input."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM
from pagellm.pooling_params import PoolingParams

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Paged attention stores keys and values in fixed-size blocks addressed by block tables. " * 2,
         "To be",
         "Continuous batching lets requests join and leave the running batch at every step. "
         "Numbers 0123456789 and punctuation are tokens too."]


def hf_hidden(path: str, texts: list[str]) -> list[torch.Tensor]:
    """transformers' last_hidden_state of each text, alone (no padding)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            out.append(model(torch.tensor([tok(t)["input_ids"]])).last_hidden_state[0].float())
    return out


def hf_logits(path: str, prompts: list) -> list[torch.Tensor]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(torch.tensor([tok(*p)["input_ids"] if isinstance(p, tuple) else tok(p)["input_ids"]]))
                .logits[0].float() for p in prompts]


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gpt_neox", "mistral", "gemma2", "deepseek_v3",
                                  "gpt_oss"])
def test_embeddings_match_transformers(pooling_models, arch):
    path = pooling_models[f"{arch}-embed"]
    llm = LLM(path, max_model_len=256)
    assert llm.llm_engine.config.model.pooler.task == "embed"  # a bare decoder checkpoint: runner auto -> pooling
    outs = llm.embed(TEXTS, use_tqdm=False)
    for out, h in zip(outs, hf_hidden(path, TEXTS)):
        assert out.outputs.hidden_size == h.shape[1]
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), normalize(h[-1]), atol=2e-5, rtol=1e-4)
    raw = llm.embed(TEXTS[:1], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(raw), hf_hidden(path, TEXTS[:1])[0][-1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-st-mean", "qwen2-st-last"])
def test_sentence_transformers_checkpoints(pooling_models, name):
    """modules.json decides the pooling (mean / last token) and normalization; chunked prefill (16-token steps)
    and a repeated prompt (prefix cache) give sentence-transformers' embeddings."""
    from sentence_transformers import SentenceTransformer

    path = pooling_models[name]
    st = SentenceTransformer(path, device="cpu")
    ref = torch.tensor(st.encode(TEXTS + TEXTS[:2], batch_size=1))
    llm = LLM(path, max_model_len=256, max_num_batched_tokens=16, max_num_seqs=4)
    expected = "MEAN" if "mean" in name else "LAST"
    assert llm.llm_engine.config.model.pooler.pooling_type == expected
    outs = llm.embed(TEXTS + TEXTS[:2], use_tqdm=False)
    got = torch.tensor([o.outputs.embedding for o in outs])
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    hits = llm.embed(TEXTS[1:2], use_tqdm=False)[0].num_cached_tokens
    assert (hits > 0) == (expected == "LAST")  # mean pooling needs every position: no prefix-cache hits


@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS", "LAST"])
def test_pooling_types_over_chunks(pooling_models, pooling_type):
    path = pooling_models["llama-embed"]
    llm = LLM(path, max_model_len=256, max_num_batched_tokens=8, max_num_seqs=2,
              pooler_config={"pooling_type": pooling_type})
    outs = llm.embed(TEXTS, use_tqdm=False)
    for out, h in zip(outs, hf_hidden(path, TEXTS)):
        pooled = {"MEAN": h.mean(0), "CLS": h[0], "LAST": h[-1]}[pooling_type]
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), normalize(pooled), atol=2e-5, rtol=1e-4)


def test_token_embeddings(pooling_models):
    path = pooling_models["qwen3-embed"]
    llm = LLM(path, max_model_len=256, max_num_batched_tokens=8)
    outs = llm.encode(TEXTS[:2], pooling_task="token_embed", use_tqdm=False)
    for out, h in zip(outs, hf_hidden(path, TEXTS[:2])):
        assert out.outputs.data.shape == h.shape
        torch.testing.assert_close(out.outputs.data, normalize(h), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_classification_matches_transformers(pooling_models, arch):
    path = pooling_models[f"{arch}-cls"]
    llm = LLM(path, max_model_len=256)
    pooler = llm.llm_engine.config.model.pooler
    assert pooler.task == "classify" and pooler.labels == ("class_0", "class_1", "class_2")
    outs = llm.classify(TEXTS, use_tqdm=False)
    ref = hf_logits(path, TEXTS)
    for out, logits in zip(outs, ref):
        assert out.outputs.num_classes == 3
        torch.testing.assert_close(torch.tensor(out.outputs.probs), logits.softmax(-1), atol=2e-5, rtol=1e-4)
    raw = llm.classify(TEXTS[:1], PoolingParams(use_activation=False), use_tqdm=False)[0].outputs.probs
    torch.testing.assert_close(torch.tensor(raw), ref[0], atol=2e-5, rtol=1e-4)


def test_cross_encoder_scores(pooling_models):
    path = pooling_models["llama-cross"]
    llm = LLM(path, max_model_len=256)
    docs = TEXTS[1:]
    outs = llm.score(TEXTS[0], docs, use_tqdm=False)
    ref = hf_logits(path, [(TEXTS[0], d) for d in docs])
    assert [o.outputs.score for o in outs] == pytest.approx([float(r.sigmoid()[0]) for r in ref], abs=2e-5)
    pairwise = llm.score(TEXTS[:2], TEXTS[2:], use_tqdm=False)
    ref = hf_logits(path, list(zip(TEXTS[:2], TEXTS[2:])))
    assert [o.outputs.score for o in pairwise] == pytest.approx([float(r.sigmoid()[0]) for r in ref], abs=2e-5)
    with pytest.raises(ValueError, match="pairs one text with N"):
        llm.score(TEXTS[:2], TEXTS[:3])


def test_embedding_scores_are_cosine_similarities(pooling_models):
    path = pooling_models["llama-embed"]
    outs = LLM(path, max_model_len=256).score(TEXTS[0], TEXTS[1:], use_tqdm=False)
    hs = hf_hidden(path, TEXTS)
    ref = [float(torch.nn.functional.cosine_similarity(hs[0][-1], h[-1], dim=0)) for h in hs[1:]]
    assert [o.outputs.score for o in outs] == pytest.approx(ref, abs=2e-5)


def test_matryoshka_dimensions(pooling_models):
    path = pooling_models["llama-matryoshka"]
    llm = LLM(path, max_model_len=256)
    out = llm.embed(TEXTS[:1], PoolingParams(dimensions=16), use_tqdm=False)[0].outputs.embedding
    h = hf_hidden(path, TEXTS[:1])[0][-1]
    torch.testing.assert_close(torch.tensor(out), normalize(h[:16]), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="dimensions must be <= 64"):
        llm.embed(TEXTS[:1], PoolingParams(dimensions=65))
    plain = LLM(pooling_models["llama-embed"], max_model_len=256)
    with pytest.raises(ValueError, match="does not support Matryoshka") as e:
        plain.embed(TEXTS[:1], PoolingParams(dimensions=16))
    assert e.value.param == "dimensions"


def test_bad_requests(pooling_models, llama_path):
    emb = LLM(pooling_models["llama-embed"], max_model_len=64)
    with pytest.raises(ValueError, match="pooling model"):
        emb.generate("hello")
    with pytest.raises(ValueError, match="serves embed and token_embed") as e:
        emb.classify("hello")
    assert e.value.param == "task"
    with pytest.raises(ValueError, match="does not take use_activation"):
        emb.embed("hello", PoolingParams(use_activation=True))
    with pytest.raises(ValueError, match="more than max_model_len"):
        emb.embed("x" * 400)
    full = emb.embed({"prompt_token_ids": [5] * 64}, use_tqdm=False)[0]  # nothing is generated: it may fill it
    assert len(full.prompt_token_ids) == 64 and len(full.outputs.embedding) == 64
    with pytest.raises(ValueError, match="prompt 1: .*empty"):
        emb.embed(["hello", {"prompt_token_ids": []}])
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be"):
        PoolingParams(truncate_prompt_tokens=0)
    # truncation keeps the last k tokens: the same embedding as the prompt of those tokens
    ids = emb.get_tokenizer()(TEXTS[1])["input_ids"]
    cut = emb.embed(TEXTS[1], truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-10:]
    assert cut.outputs.embedding == emb.embed({"prompt_token_ids": ids[-10:]}, use_tqdm=False)[0].outputs.embedding
    cls = LLM(pooling_models["llama-cls"], max_model_len=64)
    with pytest.raises(ValueError, match="does not take dimensions"):
        cls.classify("hello", PoolingParams(dimensions=4))
    with pytest.raises(ValueError, match="cross-encoder"):
        cls.score("a", "b")
    gen = LLM(llama_path, max_model_len=64)
    with pytest.raises(ValueError, match="runner='pooling'"):
        gen.embed("hello")
    with pytest.raises(ValueError, match="pooling architecture"):
        LLM(pooling_models["llama-embed"], runner="generate")
    with pytest.raises(ValueError, match="pooler_config.pooling_type"):
        LLM(pooling_models["llama-embed"], pooler_config={"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="unknown fields"):
        LLM(pooling_models["llama-embed"], pooler_config={"pool": "MEAN"})


def test_causal_checkpoint_as_embedding_model(tiny_models, pooling_models):
    """--runner pooling on a *ForCausalLM checkpoint: its LM head is not loaded; the embeddings equal those of
    the bare decoder saved from it."""
    llm = LLM(tiny_models["llama"], runner="pooling", max_model_len=256)
    assert getattr(llm.llm_engine.executor.runner.model, "lm_head", None) is None
    got = [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]
    ref = [normalize(h[-1]) for h in hf_hidden(pooling_models["llama-embed"], TEXTS)]
    torch.testing.assert_close(torch.tensor(got), torch.stack(ref), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"missing weights: \['score.weight'\]"):  # no classification head
        LLM(tiny_models["llama"], runner="pooling", convert="classify", max_model_len=64)


def test_preemption_mid_prompt_restarts_the_pooling(pooling_models):
    """A mean-pooled prompt preempted after some of its chunks (a higher-priority request needs its place) is
    recomputed from its first token: the partial sum is dropped, the embedding is the same."""
    path = pooling_models["llama-st-mean"]
    ref = [o.outputs.embedding for o in LLM(path, max_model_len=256).embed(TEXTS[:2], use_tqdm=False)]
    engine = LLM(path, max_model_len=256, max_num_seqs=1, max_num_batched_tokens=8,
                 scheduling_policy="priority").llm_engine
    low = engine.process_pooling_input(TEXTS[1], PoolingParams(task="embed"))
    low.priority = 1
    engine.add_request("low", low)
    engine.step()
    engine.step()  # 16 of its tokens computed
    assert engine.scheduler.requests["low"].seqs[0].num_computed_tokens == 16
    engine.add_request("high", engine.process_pooling_input(TEXTS[0], PoolingParams(task="embed")))
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step()})
    assert engine.scheduler.num_preemptions == 1
    assert done["high"].outputs.data.tolist() == pytest.approx(ref[0], abs=2e-5)
    assert done["low"].outputs.data.tolist() == pytest.approx(ref[1], abs=2e-5)
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks


def test_abort_and_async_scheduling_free_every_block(pooling_models):
    """Aborted pooling requests free their blocks; async scheduling gives the same outputs."""
    path = pooling_models["llama-st-mean"]
    ref = [o.outputs.embedding for o in LLM(path, max_model_len=256).embed(TEXTS * 3, use_tqdm=False)]
    for kwargs in ({"max_num_batched_tokens": 16}, {"async_scheduling": True, "max_num_batched_tokens": 16}):
        llm = LLM(path, max_model_len=256, max_num_seqs=6, **kwargs)
        got = [o.outputs.embedding for o in llm.embed(TEXTS * 3, use_tqdm=False)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=2e-5, rtol=1e-4)
        engine = llm.llm_engine
        kv = engine.scheduler.kv
        assert kv.num_free_blocks == kv.num_total_blocks
        for i, t in enumerate(TEXTS):
            engine.add_request(f"r{i}", t, PoolingParams(task="embed"))
        done = {out.request_id: out for out in engine.step()}
        engine.abort_request(["r1", "r3"])
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out
        assert sorted(done) == ["r0", "r2"]
        assert done["r0"].outputs.data.tolist() == pytest.approx(ref[0], abs=2e-5)
        assert kv.num_free_blocks == kv.num_total_blocks


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_pooling_under_tensor_and_pipeline_parallelism(pooling_models, parallel):
    """Two ranks: each holds half of every layer (tensor parallel), or half the layers (pipeline stages); the rank
    that samples (the last stage's) pools (mean) and applies the classification head."""
    for name, task in (("llama-st-mean", "embed"), ("qwen2-cls", "classify")):
        one = LLM(pooling_models[name], max_model_len=128).encode(TEXTS[:2], pooling_task=task, use_tqdm=False)
        with LLM(pooling_models[name], max_model_len=128, **parallel) as llm:
            two = llm.encode(TEXTS[:2], pooling_task=task, use_tqdm=False)
        for a, b in zip(one, two):
            torch.testing.assert_close(b.outputs.data, a.outputs.data, atol=2e-5, rtol=1e-4)


def test_async_engine_encode(pooling_models):
    import asyncio

    from pagellm import AsyncLLMEngine, EngineArgs

    path = pooling_models["llama-embed"]
    ref = LLM(path, max_model_len=128).embed(TEXTS, use_tqdm=False)

    async def run():
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=path, max_model_len=128), separate_process=False)
        try:
            async def one(i, text):
                return [out async for out in engine.encode(text, PoolingParams(task="embed"), f"e{i}")]

            return await asyncio.gather(*(one(i, t) for i, t in enumerate(TEXTS)))
        finally:
            await engine.shutdown()

    for outs, r in zip(asyncio.run(run()), ref):
        assert len(outs) == 1 and outs[0].finished
        assert outs[0].outputs.data.tolist() == pytest.approx(r.outputs.embedding, abs=1e-6)


def test_a_failed_step_is_a_clear_error_and_the_engine_goes_on(pooling_models, monkeypatch):
    """A forward pass that raises fails its requests (every block freed) with an error naming the cause; the next
    call runs as usual."""
    from pagellm.worker.model_runner import ModelRunner

    llm = LLM(pooling_models["llama-embed"], max_model_len=128)
    ref = llm.embed(TEXTS[:2], use_tqdm=False)
    real = ModelRunner.execute_model_async
    calls = {"n": 0}

    def flaky(self, sched):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(self, sched)

    monkeypatch.setattr(ModelRunner, "execute_model_async", flaky)
    with pytest.raises(RuntimeError, match="failed in the engine: .*injected fault"):
        llm.embed(TEXTS[:2], use_tqdm=False)
    kv = llm.llm_engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
    again = llm.embed(TEXTS[:2], use_tqdm=False)  # (a prefix-cache hit now: the same values up to rounding)
    torch.testing.assert_close(torch.tensor([o.outputs.embedding for o in again]),
                               torch.tensor([o.outputs.embedding for o in ref]), atol=1e-5, rtol=1e-4)
