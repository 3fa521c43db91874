"""MiniMax-M2 (MiniMaxM2ForCausalLM): grouped-query attention with q/k RMSNorms over all heads and a partial rotary,
experts in every layer chosen by sigmoid scores.

    x -> RMSNorm -> q = RMSNorm(q_proj(x)) over all heads together, k likewise (as OLMo 2), RoPE on the first
         rotary_dim dims of each head, paged attention, o_proj -> + x
      -> RMSNorm -> experts: top-k of sigmoid(router) + e_score_correction_bias (the bias only chooses), weighted by
         the sigmoid scores renormalised over the k -> + residual

The router and its bias stay in float32. Checkpoints use Mixtral's names (block_sparse_moe, experts.<e>.w1/w2/w3);
the multi-token-prediction modules stored after the decoder's layers are not served.
Tensor parallel: heads split (the q/k norms' mean all-reduced: K/V heads must split over the ranks), experts as
Mixtral's.
"""

from __future__ import annotations

from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.deepseek import is_mtp_layer
from pagellm.models.moe import MixtralForCausalLM, SigmoidRoutedMoE
from pagellm.models.olmo2 import Olmo2Attention
from pagellm.models.parallel_layers import SINGLE


class MiniMaxM2Attention(Olmo2Attention):
    weight_after_cast = True  # LLaMA's RMSNorm rounding


class MiniMaxM2ForCausalLM(MixtralForCausalLM):
    attention_cls = MiniMaxM2Attention
    keep_float32 = (".mlp.gate.weight", ".mlp.e_score_correction_bias")

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return SigmoidRoutedMoE(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                                config.intermediate_size, bias=True, renormalize=True, act=config.hidden_act, tp=tp)

    def hf_name(self, name: str) -> str | None:
        return None if is_mtp_layer(self.config, name) else MixtralForCausalLM.hf_name(self, name)
