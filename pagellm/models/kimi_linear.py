"""Kimi Linear (KimiLinearForCausalLM): Kimi Delta Attention (KDA) layers, with multi-head latent attention layers
among them (every fourth), and DeepSeek-V3's experts.

    KDA layer ("linear_attention"):
        q | k | v = q_proj, k_proj, v_proj (x) -> causal depthwise convolution (its last K - 1 inputs a state), SiLU;
        q, k L2-normalised per head (q x Kd^-0.5); beta = sigmoid(b_proj(x));
        a log decay per head and key channel: g = -exp(A_log) softplus(f_b_proj(f_a_proj(x)) + dt_bias)
        per head (state S: Kd x Vd):  S = diag(exp(g_t)) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
        o -> RMSNorm per head, x weight, x sigmoid(g_b_proj(g_a_proj(x))) (float32) -> o_proj
      Gated DeltaNet's recurrence (models/gated_deltanet.py: DeltaRuleLayer) with the decay per key channel instead of
      per head.
    attention layer ("full_attention"): DeepSeek's multi-head latent attention (models/deepseek.py) without position
        embedding: the latent cache [c, k_pe] per token, k_pe kept but not rotated
    MLP: dense where mlp_layer_types says (first_k_dense_replace), else routed experts (sigmoid scores with a bias
        that only chooses, within the best groups, renormalised, x routed_scaling_factor) plus shared experts

Checkpoints store the KDA projections and the convolution's q / k / v parts apart (packed here in one in_proj and
one conv1d) and name every MLP block_sparse_moe. Tensor parallel: KDA by heads (f_a_proj and g_a_proj replicated,
f_b_proj and g_b_proj split with the heads), MLA and the experts as DeepSeek's.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from pagellm.attention.backend import AttentionMetadata
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.deepseek import DeepseekV2ForCausalLM, MLAttention, is_mtp_layer, make_deepseek_mlp
from pagellm.models.gated_deltanet import DeltaRuleLayer, HeadRMSNormGated, gated_deltanet_state_shapes
from pagellm.models.hybrid import HybridForCausalLM
from pagellm.models.mamba import pad_rows
from pagellm.models.moe import _MoEWeights
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, RowParallelLinear, even_part, parts_loader
from pagellm.models.weight_utils import CheckpointTensor, ckpt_narrow, ckpt_shape, copy_into, set_weight_loader

_KDA_PROJ = re.compile(r"^(model\.layers\.(\d+)\.self_attn\.)([qkvb])_proj\.")


class KimiDeltaAttention(DeltaRuleLayer):
    """low_rank: the decay and output gates through a head_dim-wide bottleneck (f_a_proj -> f_b_proj, g_a_proj ->
    g_b_proj: Kimi Linear), else one projection each (f_proj, g_proj: Ling 3). safe_gate_bound: the decay is
    bound x sigmoid(exp(A_log) (f + dt_bias)), rounded to the compute dtype (Ling 3's kda_safe_gate), instead of
    -exp(A_log) softplus(f + dt_bias)."""

    def __init__(self, config, tp: TPGroup = SINGLE, low_rank: bool = True,
                 safe_gate_bound: float | None = None) -> None:
        super().__init__()
        h, d, hidden = config.linear_num_heads, config.linear_head_dim, config.hidden_size
        k = config.linear_conv_kernel_dim
        gated_deltanet_state_shapes(h, h, d, d, k, tp.size)  # (checks that the heads split)
        qkv, heads = even_part(h * d, tp), even_part(h, tp)
        self.in_proj = ColumnParallelLinear(hidden, [qkv, qkv, qkv, heads], bias=False)  # q, k, v, b: shards 0-3
        self.init_recurrence(h // tp.size, h // tp.size, d, d, k, 64, [qkv, qkv, qkv], frozenset((0, 1, 2)))
        self.low_rank, self.safe_gate_bound = low_rank, safe_gate_bound
        if low_rank:
            self.f_a_proj = ColumnParallelLinear.single(hidden, d, False)  # replicated
            self.f_b_proj = ColumnParallelLinear.single(d, h * d, False, tp)
            self.g_a_proj = ColumnParallelLinear.single(hidden, d, False)  # replicated
            self.g_b_proj = ColumnParallelLinear.single(d, h * d, False, tp)
        else:
            self.f_proj = ColumnParallelLinear.single(hidden, h * d, False, tp)
            self.g_proj = ColumnParallelLinear.single(hidden, h * d, False, tp)
        self.dt_bias = nn.Parameter(torch.zeros(qkv.size))  # per head and channel
        set_weight_loader(self.dt_bias, parts_loader([qkv]))
        self.A_log = nn.Parameter(torch.zeros(1, 1, heads.size, 1))  # stored (1, 1, heads, 1), or (heads,)
        self.heads = heads
        set_weight_loader(self.A_log, self.load_a_log)
        self.o_norm = HeadRMSNormGated(d, config.rms_norm_eps, sigmoid_gate=True)
        self.o_proj = RowParallelLinear(h * d, hidden, bias=False, tp=tp)

    def load_a_log(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        dim = 2 if len(ckpt_shape(tensor)) == 4 else 0
        copy_into(param, ckpt_narrow(tensor, dim, self.heads.start, self.heads.size).reshape(param.shape))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = meta.num_tokens
        h = x[:t]
        q, k, v, b = self.in_proj.split(self.in_proj(h))
        beta = torch.sigmoid(b.float())
        f = self.f_b_proj(self.f_a_proj(h)) if self.low_rank else self.f_proj(h)
        a = (f.float() + self.dt_bias.float()).view(t, self.nv, self.dk)
        rate = torch.exp(self.A_log.float().view(self.nv, 1))
        if self.safe_gate_bound is None:
            g = -rate * torch.nn.functional.softplus(a)
        else:
            g = (self.safe_gate_bound * torch.sigmoid(rate * a)).to(x.dtype).float()
        o = self.recur(torch.cat((q, k, v), dim=-1), g, beta, state, meta)
        gate = (self.g_b_proj(self.g_a_proj(h)) if self.low_rank else self.g_proj(h)).view(t, self.nv, self.dv)
        o = self.o_norm(o, gate, x.dtype).reshape(t, self.value_dim)
        return self.o_proj(pad_rows(o, x.shape[0]))


class KimiLinearForCausalLM(_MoEWeights, HybridForCausalLM):
    mixer_name = "self_attn"  # KDA layers' checkpoint name, as the attention layers'
    updatable_in_place = False  # after_load absorbs kv_b_proj into the latent attention and drops it
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                      **{f"in_proj_{p}": ("in_proj", i) for i, p in enumerate("qkvb")},
                      **{f"{p}_conv1d": ("conv1d", i) for i, p in enumerate("qkv")}}
    renames = ((".block_sparse_moe.", ".mlp."),)
    keep_float32 = DeepseekV2ForCausalLM.keep_float32

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return config.layer_types[layer_idx] == "linear_attention"

    @classmethod
    def uses_rope(cls, config) -> bool:
        return False

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return KimiDeltaAttention(config, tp)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return MLAttention(config, layer_idx, tp)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return make_deepseek_mlp(config, layer_idx, True, tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        h, d = config.linear_num_heads, config.linear_head_dim
        return gated_deltanet_state_shapes(h, h, d, d, config.linear_conv_kernel_dim, tp_size)

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        """The attention layers' latent cache: one "K/V head" whose V is its K, whole on every rank (as DeepSeek's)."""
        return dataclasses.replace(super().geometry(config, tp_size), num_kv_heads=1,
                                   head_dim=config.kv_lora_rank + config.qk_rope_head_dim, kv_shared=True)

    def hf_name(self, name: str) -> str | None:
        name = super().hf_name(name)
        if name is None or is_mtp_layer(self.config, name):
            return None
        m = _KDA_PROJ.match(name)
        if m and self.is_state_layer(self.config, int(m.group(2))):  # (the MLA layers have a q_proj of their own)
            name = f"{m.group(1)}in_proj_{m.group(3)}." + name[m.end():]
        return name

    def after_load(self) -> None:
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            if not layer.is_recurrent:
                layer.self_attn.absorb(w.dtype, w.device)


class BailingHybridForCausalLM(KimiLinearForCausalLM):
    """Ling 3's hybrid (BailingHybridForCausalLM): Kimi Linear's layout (a latent attention layer closing every
    layer_group_size layers) with full-rank decay and output gates and the safe gate in the KDA layers, and RoPE
    (interleaved) plus a sigmoid gate per head on the latent attention layers' output."""

    renames = (("model.word_embeddings.", "model.embed_tokens."), (".attention.", ".self_attn."),
               (".self_attn.dense.", ".self_attn.o_proj."),
               (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"))

    @classmethod
    def uses_rope(cls, config) -> bool:
        return True

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return KimiDeltaAttention(config, tp, low_rank=False,
                                  safe_gate_bound=config.kda_lower_bound if config.kda_safe_gate else None)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return MLAttention(config, layer_idx, tp, head_gate=True)
