"""BERT, the encoder-only pooling model, against transformers and sentence-transformers: embeddings (CLS by
default, a sentence-transformers checkpoint's mean), classification, cross-encoder scores on text pairs (token
types after [SEP]); whole prompts per step, preemption, tensor parallelism."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM
from pagellm.pooling_params import PoolingParams

TEXTS = ["The quick brown fox jumps over the lazy dog.", "to be, or not to be: that is the question",
         "paged attention stores keys and values in fixed-size blocks", "numbers 0123456789"]


def hf_bert(path: str, texts: list, classify: bool = False) -> list[torch.Tensor]:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = (AutoModelForSequenceClassification if classify else AutoModel).from_pretrained(path).eval()
    with torch.no_grad():
        outs = [model(**tok(*t if isinstance(t, tuple) else (t,), return_tensors="pt")) for t in texts]
    return [o.logits[0] if classify else o.last_hidden_state[0] for o in outs]


def check_cls_embeddings(path: str) -> None:
    """Without sentence-transformers files an encoder pools its first token ([CLS], <s>)."""
    for out, h in zip(LLM(path).embed(TEXTS, use_tqdm=False), hf_bert(path, TEXTS)):
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.nn.functional.normalize(h[0], dim=0),
                                   atol=2e-5, rtol=1e-4)


def check_classifier_and_cross_encoder(classifier: str, cross_encoder: str) -> list[float]:
    """Class probabilities against transformers' softmax; pair scores against transformers' sigmoid and
    sentence-transformers' CrossEncoder. Returns the scores of TEXTS[0] against the others."""
    from sentence_transformers import CrossEncoder

    outs = LLM(classifier).classify(TEXTS, use_tqdm=False)
    for out, logits in zip(outs, hf_bert(classifier, TEXTS, classify=True)):
        torch.testing.assert_close(torch.tensor(out.outputs.probs), logits.softmax(-1), atol=2e-5, rtol=1e-4)
    pairs = [(TEXTS[0], t) for t in TEXTS[1:]]
    scores = [o.outputs.score for o in LLM(cross_encoder).score(TEXTS[0], TEXTS[1:], use_tqdm=False)]
    assert scores == pytest.approx([float(x.sigmoid()[0]) for x in hf_bert(cross_encoder, pairs, classify=True)],
                                   abs=2e-5)
    assert scores == pytest.approx(CrossEncoder(cross_encoder, device="cpu").predict(pairs).tolist(), abs=2e-5)
    return scores


def test_bert_embeddings(pooling_models):
    from sentence_transformers import SentenceTransformer

    check_cls_embeddings(pooling_models["bert"])
    path = pooling_models["bert-st-mean"]
    ref = torch.tensor(SentenceTransformer(path, device="cpu").encode(TEXTS))
    llm = LLM(path, max_num_seqs=3)
    config = llm.llm_engine.config
    assert config.model.pooler.pooling_type == "MEAN" and not config.scheduler.chunked_prefill
    assert not config.cache.enable_prefix_caching
    got = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS * 2, use_tqdm=False)])
    torch.testing.assert_close(got, torch.cat([ref, ref]), atol=3e-5, rtol=1e-4)


def test_bert_classification_and_cross_encoder(pooling_models):
    scores = check_classifier_and_cross_encoder(pooling_models["bert-cls"], pooling_models["bert-cross"])
    path = pooling_models["bert-cross"]  # token types 1 after [SEP]: the pair is scored, not the second text
    single = [float(x.sigmoid()[0]) for x in hf_bert(path, TEXTS[1:], classify=True)]
    assert scores != pytest.approx(single, abs=1e-3)


def test_bert_prompts_run_whole(pooling_models):
    """Each prompt is computed in one step: with a step budget of max_model_len tokens and prompts that fill most
    of it, and a KV cache too small for all of them at once, prompts wait for room instead of being split (a
    split prompt would attend over part of itself: the embeddings would differ)."""
    path = pooling_models["bert-st-mean"]
    long = [" ".join(["paged attention stores keys"] * 20)[:300], TEXTS[1] * 4, TEXTS[0] * 3]
    ref = [o.outputs.embedding for o in LLM(path).embed(long, use_tqdm=False)]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(path, max_num_batched_tokens=64)
    llm = LLM(path, max_num_batched_tokens=128, num_gpu_blocks_override=10, block_size=16)
    got = [o.outputs.embedding for o in llm.embed(long * 3, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref * 3), atol=2e-5, rtol=1e-4)
    kv = llm.llm_engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
    with pytest.raises(ValueError, match="pooling architecture"):
        LLM(path, runner="generate")


def test_bert_under_tensor_parallelism(pooling_models):
    for name, task in (("bert-st-mean", "embed"), ("bert-cross", "classify")):
        one = LLM(pooling_models[name]).encode(TEXTS, pooling_task=task, use_tqdm=False)
        with LLM(pooling_models[name], tensor_parallel_size=2) as llm:
            two = llm.encode(TEXTS, pooling_task=task, use_tqdm=False)
        for a, b in zip(one, two):
            torch.testing.assert_close(b.outputs.data, a.outputs.data, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="does not take normalize"):
        LLM(pooling_models["bert-cls"]).classify("hi", PoolingParams(normalize=True))
