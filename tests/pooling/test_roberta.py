"""RoBERTa and XLM-R, BERT's encoder with positions after the padding index and a pooler-less classification head,
against transformers and sentence-transformers."""

from __future__ import annotations

import torch

from pagellm import LLM
from tests.pooling.test_bert import TEXTS, check_classifier_and_cross_encoder, check_cls_embeddings


def test_roberta_and_xlmr_embeddings(pooling_models):
    from sentence_transformers import SentenceTransformer

    path = pooling_models["roberta-st-mean"]
    ref = torch.tensor(SentenceTransformer(path, device="cpu").encode(TEXTS))
    llm = LLM(path, max_num_seqs=3)
    assert llm.llm_engine.config.model.max_model_len == 128  # 130 positions, the first two before the text
    got = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    path = pooling_models["xlmr"]
    check_cls_embeddings(path)
    full = LLM(path).embed({"prompt_token_ids": [5] * 128}, use_tqdm=False)[0]  # the last position exists
    assert len(full.outputs.embedding) == 64


def test_roberta_classification_and_xlmr_cross_encoder(pooling_models):
    check_classifier_and_cross_encoder(pooling_models["roberta-cls"], pooling_models["xlmr-cross"])
