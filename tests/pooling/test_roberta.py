"""RoBERTa and XLM-R, BERT's encoder with positions after the padding index and a pooler-less classification head,
against transformers and sentence-transformers."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM
from tests.pooling.test_bert import TEXTS, hf_bert


def test_roberta_and_xlmr_embeddings(pooling_models):
    from sentence_transformers import SentenceTransformer

    path = pooling_models["roberta-st-mean"]
    ref = torch.tensor(SentenceTransformer(path, device="cpu").encode(TEXTS))
    llm = LLM(path, max_num_seqs=3)
    assert llm.llm_engine.config.model.max_model_len == 128  # 130 positions, the first two before the text
    got = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    path = pooling_models["xlmr"]
    outs = LLM(path).embed(TEXTS, use_tqdm=False)  # CLS (<s>) pooling without sentence-transformers files
    for out, h in zip(outs, hf_bert(path, TEXTS)):
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.nn.functional.normalize(h[0], dim=0),
                                   atol=2e-5, rtol=1e-4)
    full = LLM(path).embed({"prompt_token_ids": [5] * 128}, use_tqdm=False)[0]  # the last position exists
    assert len(full.outputs.embedding) == 64


def test_roberta_classification_and_xlmr_cross_encoder(pooling_models):
    from sentence_transformers import CrossEncoder

    path = pooling_models["roberta-cls"]
    outs = LLM(path).classify(TEXTS, use_tqdm=False)
    for out, logits in zip(outs, hf_bert(path, TEXTS, classify=True)):
        torch.testing.assert_close(torch.tensor(out.outputs.probs), logits.softmax(-1), atol=2e-5, rtol=1e-4)
    path = pooling_models["xlmr-cross"]
    pairs = [(TEXTS[0], t) for t in TEXTS[1:]]
    scores = [o.outputs.score for o in LLM(path).score(TEXTS[0], TEXTS[1:], use_tqdm=False)]
    assert scores == pytest.approx([float(x.sigmoid()[0]) for x in hf_bert(path, pairs, classify=True)], abs=2e-5)
    assert scores == pytest.approx(CrossEncoder(path, device="cpu").predict(pairs).tolist(), abs=2e-5)
