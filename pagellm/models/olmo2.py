"""OLMo 2 (Olmo2ForCausalLM): LLaMA's projections with norms after the blocks and on the whole of q and k.

    x -> attention: q = RMSNorm(q_proj(x)) over all heads together, k likewise, RoPE, paged attention, o_proj
           -> post_attention_layernorm -> + x
      -> mlp -> post_feedforward_layernorm -> + residual                  (no norm before either block)

Under tensor parallelism a rank holds some heads of q and k, while the norm's mean runs over all of them:
each rank sums its squares, the sums are all-reduced, and each rank scales its own slice with its own
rows of the weight. K/V heads must then split over the ranks (not be replicated).
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.llama import AttentionOptions, LlamaAttention, LlamaForCausalLM
from pagellm.models.parallel_layers import SINGLE, Part
from pagellm.models.weight_utils import ckpt_narrow, copy_into, set_weight_loader


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a dimension split across ranks: this rank's slice `part` of the weight, the mean of squares
    all-reduced over the ranks. As Olmo2RMSNorm: float32, the weight applied before the cast back; with
    `weight_after_cast`, as LLaMA's RMSNorm: after it."""

    def __init__(self, part: Part, eps: float, tp: TPGroup, weight_after_cast: bool = False) -> None:
        super().__init__()
        self.part, self.eps, self.tp, self.weight_after_cast = part, eps, tp, weight_after_cast
        self.weight = nn.Parameter(torch.ones(part.size))
        set_weight_loader(self.weight, self.load)

    def load(self, param: torch.Tensor, tensor, shard_id=None) -> None:
        copy_into(param, ckpt_narrow(tensor, 0, self.part.start, self.part.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        ss = x32.pow(2).sum(-1, keepdim=True)
        if self.tp.size > 1:
            ss = self.tp.all_reduce(ss.contiguous())
        x32 = x32 * torch.rsqrt(ss / self.part.full_size + self.eps)
        if self.weight_after_cast:
            return self.weight * x32.to(x.dtype)
        return (self.weight.float() * x32).to(x.dtype)


class Olmo2Attention(LlamaAttention):
    weight_after_cast = False  # the q/k norms' rounding (ShardedRMSNorm)

    def __init__(self, config, layer_idx: int, opts: AttentionOptions, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, layer_idx, opts, tp)
        q_part, k_part, _ = self.qkv_proj.parts
        if k_part.size * tp.size != k_part.full_size:
            raise ValueError(f"{type(self).__name__} normalises k over all K/V heads: "
                             f"tensor_parallel_size={tp.size} must divide its {config.num_key_value_heads} K/V heads.")
        self.q_norm = ShardedRMSNorm(q_part, config.rms_norm_eps, tp, self.weight_after_cast)
        self.k_norm = ShardedRMSNorm(k_part, config.rms_norm_eps, tp, self.weight_after_cast)

    def heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = q.shape[0]
        return (self.q_norm(q).reshape(t, self.num_heads, self.head_dim),
                self.k_norm(k).reshape(t, self.num_kv_heads, self.head_dim))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, family: type[LlamaForCausalLM], tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx, family.attention_options(config), tp)
        self.mlp = family.make_mlp(config, layer_idx, tp)
        whole = Part(config.hidden_size, 0, config.hidden_size)  # replicated: Olmo2RMSNorm's rounding
        self.post_attention_layernorm = ShardedRMSNorm(whole, config.rms_norm_eps, SINGLE)
        self.post_feedforward_layernorm = ShardedRMSNorm(whole, config.rms_norm_eps, SINGLE)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        x = x + self.post_attention_layernorm(self.self_attn(positions, x, rotary, kv_cache, meta, backend))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2ForCausalLM(LlamaForCausalLM):
    decoder_layer = Olmo2DecoderLayer
