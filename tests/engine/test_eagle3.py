"""Speculative decoding with an EAGLE-3 head (method "eagle3", vLLM's): random heads in the EAGLE-3 checkpoint layout
(midlayer.*, fc over three of the model's hidden states, its own smaller vocabulary mapped by d2t) beside test models.
Every proposal equals the one computed from transformers' modules (the model's hidden states entering the chosen
layers, then the head's layer as vLLM's Eagle3LlamaForCausalLM defines it), and the output is the model's own greedy
output, with prefill chunks, rejected drafts and TP=2."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagellm import LLM, SamplingParams
from tests.engine.test_mtp import spy_proposals
from tests.models.test_hybrid import assert_matches_hf, prompts

K = 3


def make_head(target: str, dst: str, aux_ids: list[int] | None = None, draft_vocab: int | None = None,
              with_embedding: bool = False, layers: int = 1) -> str:
    """A random EAGLE-3 head for `target` (its hidden size, heads and vocabulary); `draft_vocab`: the head's own
    vocabulary, a random sorted subset of the model's mapped by d2t (offsets)."""
    from transformers import AutoConfig

    t = AutoConfig.from_pretrained(target)
    hidden, heads = t.hidden_size, t.num_attention_heads
    kvh, d = t.num_key_value_heads, getattr(t, "head_dim", None) or hidden // heads
    vocab = t.vocab_size
    dv = draft_vocab or vocab
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": 2 * hidden, "num_attention_heads": heads, "num_key_value_heads": kvh, "head_dim": d,
           "num_hidden_layers": layers, "vocab_size": vocab, "draft_vocab_size": dv, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False}
    if aux_ids is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_ids}
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    g = torch.Generator().manual_seed(7)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {"midlayer.self_attn.q_proj.weight": rand(heads * d, 2 * hidden),
         "midlayer.self_attn.k_proj.weight": rand(kvh * d, 2 * hidden),
         "midlayer.self_attn.v_proj.weight": rand(kvh * d, 2 * hidden),
         "midlayer.self_attn.o_proj.weight": rand(hidden, heads * d),
         "midlayer.mlp.gate_proj.weight": rand(2 * hidden, hidden),
         "midlayer.mlp.up_proj.weight": rand(2 * hidden, hidden),
         "midlayer.mlp.down_proj.weight": rand(hidden, 2 * hidden), "fc.weight": rand(hidden, 3 * hidden, scale=0.1),
         "lm_head.weight": rand(dv, hidden, scale=0.5)}
    for name in ("midlayer.input_layernorm", "midlayer.hidden_norm", "midlayer.post_attention_layernorm", "norm"):
        w[name + ".weight"] = torch.rand(hidden, generator=g) + 0.5
    ids = torch.sort(torch.randperm(vocab, generator=g)[:dv]).values
    w["d2t"] = ids - torch.arange(dv)
    w["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, ids, True)
    if with_embedding:
        w["embed_tokens.weight"] = rand(vocab, hidden, scale=1.0)
    save_file(w, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


class Reference:
    """EAGLE-3 proposals from transformers' modules: the model's hidden states entering the aux layers, then the
    head's layer (RoPE, GQA attention, SwiGLU MLP, RMSNorms from transformers' LLaMA) over every entry each pass."""

    def __init__(self, target: str, head: str, aux_ids: tuple[int, ...]) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

        self.hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        self.cfg = AutoConfig.from_pretrained(head)
        self.w = load_file(os.path.join(head, "model.safetensors"))
        self.aux = aux_ids
        h = self.cfg.hidden_size
        self.norms = {}
        for name in ("midlayer.input_layernorm", "midlayer.hidden_norm", "midlayer.post_attention_layernorm", "norm"):
            self.norms[name] = LlamaRMSNorm(h, eps=self.cfg.rms_norm_eps)
            self.norms[name].weight.data.copy_(self.w[name + ".weight"])
        self.mlp = LlamaMLP(self.cfg)
        self.mlp.load_state_dict({k[len("midlayer.mlp."):]: v for k, v in self.w.items()
                                  if k.startswith("midlayer.mlp.")})
        self.rotary = LlamaRotaryEmbedding(self.cfg)
        self.embed = self.w.get("embed_tokens.weight", self.hf.model.embed_tokens.weight.detach())

    def layer(self, ids: list[int], g: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        c, w, n = self.cfg, self.w, len(ids)
        heads, kvh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x = torch.cat((self.norms["midlayer.input_layernorm"](self.embed[torch.tensor(ids)]),
                       self.norms["midlayer.hidden_norm"](g)), -1)
        q = (x @ w["midlayer.self_attn.q_proj.weight"].t()).view(1, n, heads, d).transpose(1, 2)
        k = (x @ w["midlayer.self_attn.k_proj.weight"].t()).view(1, n, kvh, d).transpose(1, 2)
        v = (x @ w["midlayer.self_attn.v_proj.weight"].t()).view(1, n, kvh, d).transpose(1, 2)
        cos, sin = self.rotary(x[None], torch.arange(n)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        att = torch.softmax((q @ k.transpose(-1, -2)) * d ** -0.5 + torch.full((n, n), float("-inf")).triu(1), -1)
        o = (att @ v).transpose(1, 2).reshape(n, heads * d) @ w["midlayer.self_attn.o_proj.weight"].t()
        r = g + o
        return r + self.mlp(self.norms["midlayer.post_attention_layernorm"](r))

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        out = self.hf(torch.tensor([tokens[:-1]]), output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i][0] for i in self.aux], -1)  # hidden_states[i]: layer i's input
        g = aux @ self.w["fc.weight"].t()
        entries, drafts = list(tokens[1:]), []
        for _ in range(k):
            y = self.layer(entries, g)
            i = int((self.norms["norm"](y[-1]) @ self.w["lm_head.weight"].t()).argmax())
            d = i + int(self.w["d2t"][i])
            drafts.append(d)
            entries.append(d)
            g = torch.cat((g, y[-1:]))
        return drafts


@pytest.fixture(scope="module")
def heads(tiny_models, tmp_path_factory):
    from tests.conftest import DEMO_MODEL

    root = tmp_path_factory.mktemp("eagle3")
    return {"llama": make_head(tiny_models["llama"], str(root / "llama"), aux_ids=[0, 1, 1], draft_vocab=200),
            "demo": make_head(DEMO_MODEL, str(root / "demo"), with_embedding=True)}


@pytest.mark.parametrize("batched, tp", [(2048, 1), (5, 1), (2048, 2)])
def test_proposals_equal_transformers_modules_and_outputs_the_models(tiny_models, heads, monkeypatch, batched, tp):
    """The head's own vocabulary (200 of 512 tokens, d2t), aux layers 0, 1, 1 of the 2-layer model; chunks of 5."""
    target, head = tiny_models["llama"], heads["llama"]
    check_head(monkeypatch, target, {"method": "eagle3", "model": head, "num_speculative_tokens": K}, batched, tp,
               lambda: Reference(target, head, (0, 1, 1)))


def check_head(monkeypatch, target: str, spec: dict, batched: int, tp: int, reference) -> None:
    """The model's greedy output with the head drafting (prompts of 1 to 30 tokens, blocks of 4, chunks of `batched`
    tokens), and its first proposals equal to reference().drafts; every block free afterwards."""
    seen = spy_proposals(monkeypatch)
    ps = prompts(512, lengths=(1, 4, 13, 30))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    llm = LLM(target, block_size=4, num_gpu_blocks_override=256, max_num_batched_tokens=batched,
              tensor_parallel_size=tp, speculative_config=spec)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        assert_matches_hf(target, ps, outs, max_tokens=12)
        assert len(seen) >= 4 * 3
        ref = reference()
        for tokens, d in [x for x in seen if len(x[0]) > 1][:24]:
            assert d == ref.drafts(tokens, len(d)), f"proposal after {len(tokens)} tokens"
        stats = llm.llm_engine.get_stats()
        assert stats.spec_num_draft_tokens > 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.shutdown()


def test_default_aux_layers_own_embedding_and_method_inferred(heads, monkeypatch):
    """The demo model (6 layers): aux layers 2, 3, 3 (vLLM's default), the head's own embedding; the method comes
    from the head's architectures when speculative_config names only the model."""
    from tests.conftest import DEMO_MODEL

    seen = spy_proposals(monkeypatch)
    llm = LLM(DEMO_MODEL, block_size=8, num_gpu_blocks_override=128,
              speculative_config={"model": heads["demo"], "num_speculative_tokens": 2})
    assert llm.llm_engine.config.scheduler.speculative.method == "eagle3"
    assert llm.llm_engine.config.scheduler.speculative.aux_layers == (2, 3, 3)
    ps = [[5, 9, 33, 70, 12, 8], [100, 200, 300]]
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(temperature=0, max_tokens=10,
                                                                                ignore_eos=True), use_tqdm=False)
    plain = LLM(DEMO_MODEL, block_size=8, num_gpu_blocks_override=128).generate(
        [{"prompt_token_ids": p} for p in ps], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    ref = Reference(DEMO_MODEL, heads["demo"], (2, 3, 3))
    for tokens, d in [x for x in seen if len(x[0]) > 1][:8]:
        assert d == ref.drafts(tokens, len(d))


def test_refusals(tiny_models, heads, tmp_path):
    spec = {"method": "eagle3", "model": heads["llama"], "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="LLaMA-family"):
        LLM(tiny_models["granitemoehybrid"], speculative_config=spec)
    two = make_head(tiny_models["llama"], str(tmp_path / "two"), aux_ids=[0, 1, 1], layers=2)
    with pytest.raises(ValueError, match="one decoder layer"):
        LLM(tiny_models["llama"], speculative_config={**spec, "model": two})
    far = make_head(tiny_models["llama"], str(tmp_path / "far"), aux_ids=[0, 1, 5])
    with pytest.raises(ValueError, match="inputs of model layers"):
        LLM(tiny_models["llama"], speculative_config={**spec, "model": far})
    with pytest.raises(ValueError, match="EAGLE-3 head's directory"):
        LLM(tiny_models["llama"], speculative_config={"method": "eagle3", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="no Medusa"):
        LLM(tiny_models["llama"], speculative_config={"method": "medusa", "model": heads["llama"],
                                                      "num_speculative_tokens": 2})
    broken = str(tmp_path / "broken")
    shutil.copytree(heads["llama"], broken)
    w = load_file(os.path.join(broken, "model.safetensors"))
    del w["fc.weight"]
    save_file(w, os.path.join(broken, "model.safetensors"))
    with pytest.raises(ValueError, match="speculative_config.model: .*missing weights"):
        LLM(tiny_models["llama"], speculative_config={**spec, "model": broken})
