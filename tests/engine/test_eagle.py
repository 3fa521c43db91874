"""Speculative decoding with an EAGLE-1 head (method "eagle", vLLM's EagleLlamaForCausalLM): random heads in the
EAGLE authors' layout (fc with its bias, layers.N.*, the first layer without its input norm) and in the speculators
layout (fusion_fc, HASS norms, two layers) beside the test model. Every proposal equals the one computed from
transformers' modules (the model's last hidden state; transformers' LLaMA decoder layers over fc's output; the
model's own LM head), and the output is the model's own greedy output, with prefill chunks and TP=2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagellm import LLM
from tests.engine.test_eagle3 import check_head


def make_head(target: str, dst: str, layers: int = 1, speculators: bool = False) -> str:
    """A random EAGLE-1 head for `target`: the authors' names (fc.weight, fc.bias, layers.N.*; an embedding that the
    engine must ignore), or the speculators' (fusion_fc, add_para_norm's two norms)."""
    from transformers import AutoConfig

    t = AutoConfig.from_pretrained(target)
    hidden, heads, kvh = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    d = getattr(t, "head_dim", None) or hidden // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": 2 * hidden, "num_attention_heads": heads, "num_key_value_heads": kvh, "head_dim": d,
           "num_hidden_layers": layers, "vocab_size": t.vocab_size, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "add_para_norm": speculators}
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    g = torch.Generator().manual_seed(11)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {}
    for i in range(layers):
        p = f"layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rand(heads * d, hidden), p + "self_attn.k_proj.weight":
                  rand(kvh * d, hidden), p + "self_attn.v_proj.weight": rand(kvh * d, hidden),
                  p + "self_attn.o_proj.weight": rand(hidden, heads * d), p + "mlp.gate_proj.weight":
                  rand(2 * hidden, hidden), p + "mlp.up_proj.weight": rand(2 * hidden, hidden),
                  p + "mlp.down_proj.weight": rand(hidden, 2 * hidden),
                  p + "post_attention_layernorm.weight": torch.rand(hidden, generator=g) + 0.5})
        if i:
            w[p + "input_layernorm.weight"] = torch.rand(hidden, generator=g) + 0.5
    fc = "fusion_fc" if speculators else "fc"
    w[fc + ".weight"] = rand(hidden, 2 * hidden, scale=0.15)
    if speculators:
        w["embedding_layernorm.weight"] = torch.rand(hidden, generator=g) + 0.5
        w["pre_lm_head_layernorm.weight"] = torch.rand(hidden, generator=g) + 0.5  # (vLLM: hidden_states_layernorm)
    else:
        w["fc.bias"] = rand(hidden)
        w["embed_tokens.weight"] = rand(t.vocab_size, hidden, scale=1.0)  # shared with the model's instead
    save_file(w, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


class Reference:
    """EAGLE-1 proposals from transformers' modules over every entry each pass."""

    def __init__(self, target: str, head: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        self.hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        cfg = AutoConfig.from_pretrained(head)
        cfg._attn_implementation = "eager"
        self.w = w = load_file(os.path.join(head, "model.safetensors"))
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            layer = LlamaDecoderLayer(cfg, i).eval()
            own = {k[len(f"layers.{i}."):]: v for k, v in w.items() if k.startswith(f"layers.{i}.")}
            if i == 0:
                layer.input_layernorm = torch.nn.Identity()
            layer.load_state_dict(own, strict=True)
            self.layers.append(layer)
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.fc_w = w.get("fc.weight", w.get("fusion_fc.weight"))
        self.fc_b = w.get("fc.bias")
        self.norms = None
        if cfg.add_para_norm:
            self.norms = [LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) for _ in range(2)]
            self.norms[0].weight.data.copy_(w["embedding_layernorm.weight"])
            self.norms[1].weight.data.copy_(w["pre_lm_head_layernorm.weight"])

    def head(self, ids: list[int], f: torch.Tensor) -> torch.Tensor:
        e = self.hf.model.embed_tokens(torch.tensor(ids))
        if self.norms:
            e, f = self.norms[0](e), self.norms[1](f)
        x = torch.cat((e, f), -1) @ self.fc_w.t()
        x = (x if self.fc_b is None else x + self.fc_b)[None]
        n = len(ids)
        pos = torch.arange(n)[None]
        emb = self.rotary(x, pos)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=emb)
            x = x[0] if isinstance(x, tuple) else x
        return x[0]

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        f = self.hf.model(torch.tensor([tokens[:-1]])).last_hidden_state[0]  # after the model's final norm
        entries, drafts = list(tokens[1:]), []
        for _ in range(k):
            y = self.head(entries, f)
            d = int(self.hf.lm_head(y[-1]).argmax())
            drafts.append(d)
            entries.append(d)
            f = torch.cat((f, y[-1:]))
        return drafts


@pytest.fixture(scope="module")
def heads(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    return {"authors": make_head(tiny_models["llama"], str(root / "authors")),
            "speculators": make_head(tiny_models["llama"], str(root / "speculators"), layers=2, speculators=True)}


@pytest.mark.parametrize("kind, batched, tp", [("authors", 2048, 1), ("authors", 5, 1), ("speculators", 2048, 1),
                                               ("authors", 2048, 2)])
def test_proposals_equal_transformers_modules_and_outputs_the_models(tiny_models, heads, monkeypatch, kind, batched,
                                                                      tp):
    target, head = tiny_models["llama"], heads[kind]
    check_head(monkeypatch, target, {"method": "eagle", "model": head, "num_speculative_tokens": 3}, batched, tp,
               lambda: Reference(target, head))


def test_refusals(tiny_models, heads, tmp_path):
    spec = {"method": "eagle", "model": heads["authors"], "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="LLaMA-family"):
        LLM(tiny_models["granitemoehybrid"], speculative_config=spec)
    from tests.conftest import DEMO_MODEL

    with pytest.raises(ValueError, match="does not fit the model"):
        LLM(DEMO_MODEL, speculative_config=spec)
    with pytest.raises(ValueError, match="EAGLE head's directory"):
        LLM(tiny_models["llama"], speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    w = load_file(os.path.join(heads["authors"], "model.safetensors"))
    del w["layers.0.mlp.up_proj.weight"]
    save_file(w, os.path.join(broken, "model.safetensors"))
    with open(os.path.join(heads["authors"], "config.json")) as src, \
            open(os.path.join(broken, "config.json"), "w") as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match="speculative_config.model: .*missing weights"):
        LLM(tiny_models["llama"], speculative_config={**spec, "model": broken})
