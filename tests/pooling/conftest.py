"""Pooling checkpoints built from the tiny causal ones: bare decoders (`LlamaModel`, saved without the "model."
prefix), sentence-transformers directories, and *ForSequenceClassification models with seeded heads."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import MODELS_DIR


def _save(model, tok, out: str) -> str:
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_embed(src: str, out: str, pooling: str | None = None, matryoshka: bool = False) -> str:
    """The decoder of `src` as transformers' AutoModel saves it; `pooling` (lasttoken, mean_tokens, cls_token):
    also a sentence-transformers model (Transformer, Pooling, Normalize)."""
    from transformers import AutoModel, AutoTokenizer

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    model = AutoModel.from_pretrained(src)
    if matryoshka:
        model.config.is_matryoshka = True
    _save(model, AutoTokenizer.from_pretrained(src), out)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        with open(os.path.join(out, "modules.json"), "w") as f:
            json.dump(modules, f)
        os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
        os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
        cfg = {"word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True, f"pooling_mode_{pooling}": True}
        with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(out, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": 256, "do_lower_case": False}, f)
    return out


def build_classifier(src: str, out: str, num_labels: int) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    labels = {i: f"class_{i}" for i in range(num_labels)}
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels, id2label=labels,
                                                               label2id={v: k for k, v in labels.items()})
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(0))
                                 * 0.5)
    return _save(model, AutoTokenizer.from_pretrained(src), out)


@pytest.fixture(scope="session")
def pooling_models(tiny_models) -> dict[str, str]:
    root = os.path.join(MODELS_DIR, "pooling")
    out = {}
    for arch in ("llama", "qwen3", "gpt2", "gpt_neox", "mistral", "gemma2"):
        out[f"{arch}-embed"] = build_embed(tiny_models[arch], os.path.join(root, f"{arch}-embed"))
    out["llama-st-mean"] = build_embed(tiny_models["llama"], os.path.join(root, "llama-st-mean"), "mean_tokens")
    out["qwen2-st-last"] = build_embed(tiny_models["qwen2"], os.path.join(root, "qwen2-st-last"), "lasttoken")
    out["llama-matryoshka"] = build_embed(tiny_models["llama"], os.path.join(root, "llama-matryoshka"),
                                          matryoshka=True)
    for arch in ("llama", "gpt2", "qwen2"):
        out[f"{arch}-cls"] = build_classifier(tiny_models[arch], os.path.join(root, f"{arch}-cls"), 3)
    out["llama-cross"] = build_classifier(tiny_models["llama"], os.path.join(root, "llama-cross"), 1)
    return out
