"""DeepSeek-V2 and DeepSeek-V3 (and V2-Lite, R1, Kimi-K2-style checkpoints): multi-head latent attention (MLA)
over a latent KV cache, and a mixture of experts with shared experts and grouped routing. GLM-4.5 (Glm4Moe: plain
grouped-query attention with V3's experts) and GLM-4.7-Flash (Glm4MoeLite: V3 with its dense layers listed) too.

Multi-head latent attention. Each token's keys and values for all heads come from one latent vector:

    c = RMSNorm(x W_DKV)   (kv_lora_rank)          k_pe = RoPE(x W_KR)   (qk_rope_head_dim, shared by the heads)
    head h:  k_h = [c W_UK[h], k_pe]                 v_h = c W_UV[h]      (W_UK, W_UV: the rows of kv_b_proj)

The cache holds only [c, k_pe] per token and layer (576 numbers for V2/V3, against 2 x 128 heads x 192 of plain
attention). Attention runs in the latent space ("absorbed" form): the query's no-position part is turned into the
latent space once per token, q_lat[h] = q_nope[h] W_UK[h]^T, so that q_h . k_h = [q_lat[h], q_pe[h]] . [c, k_pe];
and softmax(.) V_h = (softmax(.) C) W_UV[h]. To the attention backend this is multi-query attention with one K/V
head of size kv_lora_rank + qk_rope_head_dim whose V is its K (ModelGeometry.kv_shared: one cache tensor per
layer); the backend's output keeps its first kv_lora_rank features, which W_UV[h] turns into the head's value.

    x -> q_proj (or q_a_proj -> RMSNorm -> q_b_proj) -> (T, H, nope | rope)
      -> kv_a_proj_with_mqa -> c (RMSNorm), k_pe;  RoPE on q_pe and k_pe
      -> [q_nope W_UK^T, q_pe] (T, H, r + rope), cache [c, k_pe] (T, 1, r + rope)
      -> paged attention (scale: (nope + rope)^-0.5, times mscale^2 under YaRN) -> (T, H, r) -> W_UV -> o_proj

RoPE. DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... (V3: unless config.rope_interleave is False).
The rotary part is reordered evens-then-odds before the rotate-half RoPE every other model uses: the same rotation,
and q and k move alike, so their products do not change.

Mixture of experts. Layers from first_k_dense_replace on route each token to top-k of n_routed_experts (times
routed_scaling_factor) and add n_shared_experts dense experts (one gated MLP): V2 scores with a softmax, greedily
or within the topk_group best of n_group groups (group_limited_greedy); V3 scores with a sigmoid plus a learned
bias (e_score_correction_bias) that only chooses, groups ranked by their two best experts, weights renormalised
(norm_topk_prob). The router runs in float32, its weights kept in float32 as Hugging Face keeps them.

Tensor parallel: the heads split over ranks (q_proj / q_b_proj, kv_b_proj, o_proj); the latent projections and the
cache are replicated (every rank holds the whole latent cache); experts split as in models/moe.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.layers import Attention, FusedMoE, GatedMLP, RMSNorm, RotaryEmbedding
from pagellm.models.llama import AttentionOptions, LlamaForCausalLM
from pagellm.models.moe import _MoEWeights
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, RowParallelLinear

LATENT_NORM_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm: Hugging Face builds them with the default epsilon


def routed_experts(config) -> int:
    """The number of routed experts: n_routed_experts (DeepSeek, GLM), or num_local_experts (Kimi Linear)."""
    n = getattr(config, "n_routed_experts", None)
    return n if isinstance(n, int) else config.num_local_experts


def softmax_scale(config) -> float:
    """(nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (Hugging Face's yarn_apply_mscale)."""
    import math

    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        all_dim = params.get("mscale_all_dim", 0)
        factor = params.get("factor", 1.0)
        if all_dim and factor > 1:
            m = 0.1 * all_dim * math.log(factor) + 1.0
            scale *= m * m
    return scale


class MLAttention(nn.Module):
    """head_gate: each head's output x sigmoid(g_proj(x)) before o_proj (Ling 3)."""

    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE, head_gate: bool = False) -> None:
        super().__init__()
        h = config.num_attention_heads
        self.num_heads = h // tp.size  # (geometry() checked that they split)
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.rank = config.v_head_dim, config.kv_lora_rank
        qk, bias, hidden = self.nope + self.rope, bool(getattr(config, "attention_bias", False)), config.hidden_size
        self.q_lora = getattr(config, "q_lora_rank", None)
        if self.q_lora is None:
            self.q_proj = ColumnParallelLinear.single(hidden, h * qk, False, tp)
        else:
            self.q_a_proj = ColumnParallelLinear.single(hidden, self.q_lora, bias)  # replicated
            self.q_a_layernorm = RMSNorm(self.q_lora, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear.single(self.q_lora, h * qk, False, tp)
        self.kv_a_proj_with_mqa = ColumnParallelLinear.single(hidden, self.rank + self.rope, bias)  # replicated
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear.single(self.rank, h * (self.nope + self.v_dim), False, tp)
        self.o_proj = RowParallelLinear(h * self.v_dim, hidden, bias=bias, tp=tp)
        self.g_proj = ColumnParallelLinear.single(hidden, h, False, tp) if head_gate else None
        interleaved = getattr(config, "rope_interleave", True)  # V2 has no such field: always interleaved
        self.register_buffer("rope_order", torch.cat((torch.arange(0, self.rope, 2), torch.arange(1, self.rope, 2)))
                             if interleaved else None, persistent=False)
        self.attn = Attention(self.num_heads, self.rank + self.rope, 1, softmax_scale(config))
        self.register_buffer("w_uk", None, persistent=False)  # (H, nope, rank), from kv_b_proj by absorb()
        self.register_buffer("w_uv", None, persistent=False)  # (H, rank, v_dim)

    def absorb(self, dtype: torch.dtype, device: torch.device) -> None:
        """Take W_UK and W_UV out of kv_b_proj (once its weights are loaded, quantized or not) and drop the layer:
        kv_b_proj(I) is W^T, whatever the layer stores."""
        layer = self.kv_b_proj
        eye = torch.eye(self.rank, dtype=dtype, device=device)
        with torch.no_grad():
            w = layer(eye).t().reshape(self.num_heads, self.nope + self.v_dim, self.rank)
        self.w_uk = w[:, :self.nope].contiguous()
        self.w_uv = w[:, self.nope:].transpose(1, 2).contiguous()
        del self.kv_b_proj

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q_full, kv = self.latent(positions, x, self.query_input(x), rotary)
        return self.finish(x, self.attn(q_full, kv, kv, kv_cache, meta, backend))

    def query_input(self, x: torch.Tensor) -> torch.Tensor:
        """What q_proj / q_b_proj reads: x, or its low-rank form RMSNorm(q_a_proj(x))."""
        return x if self.q_lora is None else self.q_a_layernorm(self.q_a_proj(x))

    def latent(self, positions: torch.Tensor, x: torch.Tensor, q_in: torch.Tensor,
               rotary: RotaryEmbedding | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The absorbed query (T, H, rank + rope) and the cache row [c, k_pe] (T, 1, rank + rope)."""
        t, h = x.shape[0], self.num_heads
        q = (self.q_proj(q_in) if self.q_lora is None else self.q_b_proj(q_in)).view(t, h, self.nope + self.rope)
        q_nope, q_pe = q[..., :self.nope], q[..., self.nope:]
        latent = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(latent[:, :self.rank].contiguous())
        k_pe = latent[:, None, self.rank:]
        if rotary is not None:  # (Kimi Linear: no position embedding; the rope part is kept)
            if self.rope_order is not None:
                q_pe, k_pe = q_pe.index_select(-1, self.rope_order), k_pe.index_select(-1, self.rope_order)
            q_pe, k_pe = rotary(positions, q_pe.contiguous(), k_pe.contiguous())
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # (T, H, rank)
        return torch.cat((q_lat, q_pe), dim=-1), torch.cat((c[:, None, :], k_pe.to(c.dtype)), dim=-1)

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The backend's output (T, H x width) -> its first kv_lora_rank features per head -> W_UV (-> head gate)
        -> o_proj."""
        t, h = x.shape[0], self.num_heads
        out = out.view(t, h, -1)[..., :self.rank]
        v = torch.bmm(out.transpose(0, 1), self.w_uv).transpose(0, 1)  # (T, H, v_dim)
        if self.g_proj is not None:
            v = v * torch.sigmoid(self.g_proj(x).float()).to(v.dtype)[..., None]
        return self.o_proj(v.reshape(t, h * self.v_dim))


class DeepseekRouter(nn.Module):
    """Top-k routing of DeepSeek's MoE layers (float32): weights (T, k) and expert ids (T, k)."""

    def __init__(self, config, v3: bool) -> None:
        super().__init__()
        e = routed_experts(config)
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size))
        self.v3 = v3
        if v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(e))
            self.method = "noaux_tc"
        else:
            self.method = getattr(config, "topk_method", None) or "greedy"
            if self.method not in ("greedy", "group_limited_greedy"):
                raise ValueError(f"DeepSeek-V2 topk_method {self.method!r} is not supported; supported: greedy, "
                                 "group_limited_greedy.")
        self.top_k = config.num_experts_per_tok
        self.groups = getattr(config, "n_group", None) or 1
        self.topk_group = getattr(config, "topk_group", None) or self.groups
        self.scaling = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
        self.renormalize = v3 and bool(getattr(config, "norm_topk_prob", False))  # Hugging Face's V2 never does

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight.float())  # (T, E)
        t, e = logits.shape
        if self.v3:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            grouped = choice.view(t, self.groups, e // self.groups)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
            fill = float("-inf")
        else:
            scores = choice = logits.softmax(dim=-1)
            group_scores = choice.view(t, self.groups, e // self.groups).max(dim=-1).values
            fill = 0.0
        if self.method != "greedy" and self.topk_group < self.groups:
            kept = torch.zeros_like(group_scores, dtype=torch.bool)
            kept.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], True)
            choice = choice.masked_fill(~kept.repeat_interleave(e // self.groups, dim=1), fill)
        ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class DeepseekMoE(nn.Module):
    def __init__(self, config, v3: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate = DeepseekRouter(config, v3)
        self.experts = FusedMoE(routed_experts(config), config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, config.hidden_act, False, tp)
        shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = (GatedMLP(config.hidden_size, config.moe_intermediate_size * shared, config.hidden_act,
                                        tp=tp) if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts.dispatch(x, *self.gate(x))
        return out if self.shared_experts is None else out + self.shared_experts(x)


def make_deepseek_mlp(config, layer_idx: int, v3: bool, tp: TPGroup = SINGLE) -> nn.Module:
    """A dense gated MLP before first_k_dense_replace (or where config.mlp_layer_types says "dense": GLM), routed and
    shared experts after."""
    types = getattr(config, "mlp_layer_types", None)
    dense = (types[layer_idx] == "dense" if types is not None and layer_idx < len(types)  # (past them: MTP, sparse)
             else layer_idx < (getattr(config, "first_k_dense_replace", 0) or 0))
    if dense or not routed_experts(config):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                        bias=bool(getattr(config, "mlp_bias", False)), tp=tp)
    return DeepseekMoE(config, v3, tp)


def is_mtp_layer(config, name: str) -> bool:
    """A checkpoint tensor of the multi-token-prediction layers stored after the decoder's (DeepSeek-V3's
    model.layers.61.*, GLM-4.5's): not served (the speculative method that would use them is not implemented)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= config.num_hidden_layers


class DeepseekV2ForCausalLM(_MoEWeights, LlamaForCausalLM):
    """DeepSeek-V2 / V2-Lite: MLA (q_lora_rank None: one q_proj), softmax routing, shared experts."""

    updatable_in_place = False  # after_load absorbs kv_b_proj into the attention and drops it

    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    keep_float32 = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
    v3 = False

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        """One latent "K/V head" whose V is its K, whole on every rank (the query heads split)."""
        return dataclasses.replace(super().geometry(config, tp_size), num_kv_heads=1,
                                   head_dim=config.kv_lora_rank + config.qk_rope_head_dim, kv_shared=True)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return MLAttention(config, layer_idx, tp)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return make_deepseek_mlp(config, layer_idx, cls.v3, tp)

    def hf_name(self, name: str) -> str | None:
        return None if is_mtp_layer(self.config, name) else LlamaForCausalLM.hf_name(self, name)

    def after_load(self) -> None:
        """Once the weights are in the compute dtype and on the device (models/loader.py: finish_loading)."""
        layers = self.own_layers()
        w = layers[0].input_layernorm.weight  # (in the compute dtype; routers may stay in float32)
        for layer in layers:
            layer.self_attn.absorb(w.dtype, w.device)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: MLA with a low-rank query (q_a_proj, q_b_proj), sigmoid routing with a bias that only
    chooses, experts chosen within the best groups."""

    v3 = True


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash (Glm4MoeLite): DeepSeek-V3's latent attention and routing; config.mlp_layer_types names the
    dense layers."""


class Glm4MoeForCausalLM(_MoEWeights, LlamaForCausalLM):
    """GLM-4.5 / 4.6 / 4.7 (Glm4Moe): grouped-query attention with q/k/v biases, optional q/k norms and a partial
    rotary (half the head), then DeepSeek-V3's experts (sigmoid routing with a score-correction bias, shared
    experts) after the first first_k_dense_replace dense layers."""

    keep_float32 = DeepseekV2ForCausalLM.keep_float32

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        return AttentionOptions(qkv_bias=bool(config.attention_bias), o_bias=False,
                                qk_norm=bool(getattr(config, "use_qk_norm", False)))

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return make_deepseek_mlp(config, layer_idx, True, tp)

    def hf_name(self, name: str) -> str | None:
        return None if is_mtp_layer(self.config, name) else LlamaForCausalLM.hf_name(self, name)
