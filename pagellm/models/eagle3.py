"""EAGLE-3 draft heads (speculative decoding, method "eagle3"; vLLM's Eagle3LlamaForCausalLM): one decoder layer
trained to predict the model's next tokens from three of the model's own hidden states.

    aux(p) = [x_a(p), x_b(p), x_c(p)]   the model's residual stream entering layers a, b, c at position p
                                        (config eagle_aux_hidden_state_layer_ids; default 2, L // 2, L - 3)
    entry at position p, from the token t_{p+1} and g_p:
        g_p = fc(aux(p)) for the model's positions, the head's own pre-norm output for its later passes
        h = [input_layernorm(embed(t_{p+1})), hidden_norm(g_p)]           (2 x hidden: attention's input)
        r = g_p + o_proj(attention(q, k, v of h; RoPE at p))              (norm_before_residual: hidden_norm(g_p))
        r = r + mlp(post_attention_layernorm(r))   -> the pre-norm output, the next pass's g
        logits = lm_head(norm(r)) over the head's own vocabulary (draft_vocab_size); draft token i is model token
        i + d2t[i]

The head's checkpoint (its own directory, `speculative_config.model`) names the layer midlayer.* (or layers.0.*) and
holds fc, norm, lm_head, d2t (and t2d, unused); without embed_tokens it shares the model's embedding, read from
the model's checkpoint. The head runs unsharded, beside the model: worker/drafter.py keeps its one-layer cache in
step with the model's, as for the model's own MTP layer, from the aux hidden states each step leaves
(`LlamaForCausalLM.aux_layers`).
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.config import ModelGeometry
from pagellm.models.base import CausalLM
from pagellm.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, Linear, VocabParallelEmbedding, qkv_parts

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def aux_layer_ids(draft_config, target_layers: int) -> tuple[int, ...]:
    """The model layers whose input the head reads (vLLM's default: 2, L // 2, L - 3)."""
    eagle = getattr(draft_config, "eagle_config", None) or {}
    ids = eagle.get("eagle_aux_hidden_state_layer_ids") or getattr(draft_config, "eagle_aux_hidden_state_layer_ids",
                                                                   None)
    ids = tuple(int(i) for i in ids) if ids else (2, target_layers // 2, target_layers - 3)
    if len(ids) != 3 or not all(0 <= i < target_layers for i in ids):
        raise ValueError(f"speculative_config.model: the EAGLE-3 head reads the inputs of model layers {ids}; the "
                         f"model has {target_layers} (three layer ids in 0 .. {target_layers - 1} are needed).")
    return ids


class Eagle3Layer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h, kvh = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        hidden = config.hidden_size
        d = getattr(config, "head_dim", None) or hidden // h
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = ColumnParallelLinear(2 * hidden, list(qkv_parts(h, kvh, d, SINGLE)), bias=bias)
        self.self_attn.o_proj = Linear(h * d, hidden, bias=bias)
        self.attn = Attention(h, d, kvh, d ** -0.5)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act, bias=bool(getattr(
            config, "mlp_bias", False)))
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions, embeds, g, rotary, kv_cache, meta, backend) -> torch.Tensor:
        t = g.shape[0]
        normed = self.hidden_norm(g)
        residual = normed if self.norm_before_residual else g
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        q, k, v = self.self_attn.qkv_proj.split(self.self_attn.qkv_proj(x))
        q, k = rotary(positions, q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim))
        r = residual + self.self_attn.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v, kv_cache, meta, backend))
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3LlamaForCausalLM(CausalLM):
    """The head (built from its own config; `target_vocab`: the model's vocabulary, which its tokens map into)."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    supports_tp = False

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        h = config.num_attention_heads
        kvh = getattr(config, "num_key_value_heads", None) or h
        return ModelGeometry(num_layers=1, num_kv_heads=kvh, head_dim=getattr(config, "head_dim", None)
                             or config.hidden_size // h, sliding_windows=(None,))

    def __init__(self, config, max_model_len: int, tp=SINGLE, target_dir: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.target_dir = target_dir  # the model's checkpoint: its embedding, when the head has none
        hidden = config.hidden_size
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.vocab_size = config.vocab_size
        self.draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.fc = Linear(3 * target_hidden, hidden, bias=False)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, SINGLE)
        self.layer = Eagle3Layer(config)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = VocabParallelEmbedding(self.draft_vocab, hidden, SINGLE)  # the head's rows
        self.d2t = nn.Parameter(torch.zeros(self.draft_vocab, dtype=torch.long), requires_grad=False)
        self.d2t.shard_ids = frozenset()  # optional: a head over the model's whole vocabulary maps i to i
        self.rotary = RotaryEmbedding(config, max_model_len)

    def hf_name(self, name: str) -> str | None:
        name = name.removeprefix("model.")
        if name == "t2d":
            return None
        for old in ("midlayer.", "layers.0."):
            if name.startswith(old):
                return "layer." + name[len(old):]
        return name

    def load_checkpoint(self, model_dir: str, load_format: str) -> None:
        """The head's tensors; the model's embedding where the head stores none."""
        from pagellm.models.loader import iterate_weights, load_weights

        seen: set[str] = set()

        def weights():
            for name, tensor in iterate_weights(model_dir, load_format):
                seen.add(self.hf_name(name) or "")
                yield name, tensor
            if "embed_tokens.weight" not in seen and self.target_dir is not None:
                for name, tensor in iterate_weights(self.target_dir, load_format):
                    if name == "model.embed_tokens.weight":
                        yield "embed_tokens.weight", tensor

        load_weights(self, weights())

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The model's three hidden states side by side (T, 3 x hidden) -> g (T, hidden)."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: the tokens t_{p+1}; positions: p; hidden_states: g_p -> the pre-norm output."""
        e = self.embed_tokens(input_ids)
        return self.layer(positions, e, hidden_states.to(e.dtype), self.rotary, kv_caches[0], meta, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, model vocabulary): the head's logits at their model tokens, -inf elsewhere."""
        logits = (self.norm(hidden) @ self.lm_head.weight.t()).float()
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        out[:, self.targets] = logits
        return out

    def after_load(self) -> None:
        self.targets = torch.arange(self.draft_vocab, device=self.d2t.device) + self.d2t  # head token -> model token
