"""The pooling checkpoints of the tests (tests/fixtures/pooling_models.py), built once per session."""

from __future__ import annotations

import os

import pytest
from pooling_models import (  # tests/fixtures is on sys.path (tests/conftest.py)
    build_bert,
    build_classifier,
    build_embed,
    build_roberta,
)

from tests.conftest import MODELS_DIR


@pytest.fixture(scope="session")
def pooling_models(tiny_models) -> dict[str, str]:
    root = os.path.join(MODELS_DIR, "pooling")
    out = {}
    for arch in ("llama", "qwen3", "gpt2", "gpt_neox", "mistral", "gemma2", "deepseek_v3", "gpt_oss"):
        out[f"{arch}-embed"] = build_embed(tiny_models[arch], os.path.join(root, f"{arch}-embed"))
    out["llama-st-mean"] = build_embed(tiny_models["llama"], os.path.join(root, "llama-st-mean"), "mean_tokens")
    out["qwen2-st-last"] = build_embed(tiny_models["qwen2"], os.path.join(root, "qwen2-st-last"), "lasttoken")
    out["llama-matryoshka"] = build_embed(tiny_models["llama"], os.path.join(root, "llama-matryoshka"),
                                          matryoshka=True)
    for arch in ("llama", "gpt2", "qwen2"):
        out[f"{arch}-cls"] = build_classifier(tiny_models[arch], os.path.join(root, f"{arch}-cls"), 3)
    out["llama-cross"] = build_classifier(tiny_models["llama"], os.path.join(root, "llama-cross"), 1)
    out["bert"] = build_bert(os.path.join(root, "bert"))
    out["bert-st-mean"] = build_bert(os.path.join(root, "bert-st-mean"), pooling="mean_tokens")
    out["bert-cls"] = build_bert(os.path.join(root, "bert-cls"), num_labels=3)
    out["bert-cross"] = build_bert(os.path.join(root, "bert-cross"), num_labels=1)
    out["roberta-st-mean"] = build_roberta(os.path.join(root, "roberta-st-mean"), pooling="mean_tokens")
    out["xlmr"] = build_roberta(os.path.join(root, "xlmr"), xlm=True)
    out["xlmr-cross"] = build_roberta(os.path.join(root, "xlmr-cross"), num_labels=1, xlm=True)
    out["roberta-cls"] = build_roberta(os.path.join(root, "roberta-cls"), num_labels=3)
    for arch in ("llama", "qwen2"):  # token classification (NER-style taggers)
        out[f"{arch}-tok"] = build_classifier(tiny_models[arch], os.path.join(root, f"{arch}-tok"), 4, per_token=True)
    out["bert-tok"] = build_bert(os.path.join(root, "bert-tok"), num_labels=5, per_token=True)
    out["roberta-tok"] = build_roberta(os.path.join(root, "roberta-tok"), num_labels=5, per_token=True)
    return out
