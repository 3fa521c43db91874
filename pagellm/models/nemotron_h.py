"""Nemotron-H (NemotronHForCausalLM: Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano): one mixer per block,
config.layers_block_type naming each one's kind.

    block: x += mixer(RMSNorm(x))       mixer = Mamba2 ("linear_attention": a recurrent state per sequence, dt clamped
                                          from time_step_min), attention ("full_attention": no position embedding),
                                          a squared-ReLU MLP ("mlp": down(relu(up(x))^2)) or a mixture of experts
                                          ("moe": DeepSeek-V3's sigmoid routing with a score-correction bias and
                                          groups, squared-ReLU experts without gate, a shared expert, an optional
                                          latent projection around the routed experts)
    x = embeddings(ids) ... -> norm_f -> lm_head

Checkpoint names are kept (backbone.layers.N.mixer...; transformers' own module names, model.layers.N.mixer..., as in
LoRA adapters, are read as those: RecurrentLM.backbone_names). The SSM state is kept in float32 when the config says so
(mamba_ssm_cache_dtype, as transformers does).
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import RecurrentLM
from pagellm.models.deepseek import DeepseekRouter
from pagellm.models.hybrid import HybridAttention
from pagellm.models.layers import Fp32WeightRMSNorm, FusedMoE, activation, set_weight_loader
from pagellm.models.llama import AttentionOptions
from pagellm.models.mamba import MambaMixer2, mamba2_state_shapes
from pagellm.models.moe import _MoEWeights
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_per_rank,
)
from pagellm.models.weight_utils import CheckpointTensor, ckpt_narrow, copy_into


class UngatedMLP(nn.Module):
    """down(act(up(x))): up column-parallel, down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear.single(hidden_size, intermediate_size, bias, tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class UngatedExperts(FusedMoE):
    """FusedMoE whose experts are down(act(up(x))), without a gate: w13 holds the up projection alone (E, I, H)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, act: str,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__(num_experts, top_k, hidden_size, intermediate_size, act, False, tp)
        experts = range(self.e_start, self.e_start + self.num_local_experts)
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, self.intermediate_size, hidden_size))
        set_weight_loader(self.w13, self.load_up, frozenset((e, 1) for e in experts))

    def load_up(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        """One expert's up_proj (shard (e, 1)), or all of them stacked (E, I, H)."""
        start, local = self.i_start, self.intermediate_size
        if shard_id is None:
            copy_into(param, ckpt_narrow(tensor, 0, self.e_start, self.num_local_experts)[:, start:start + local])
            return
        e = self.local_expert(shard_id[0])
        if e is not None:
            copy_into(param[e], ckpt_narrow(tensor, 0, start, local))

    def expert_forward(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        up, down = self.expert_weights(e, rows.dtype)
        return torch.nn.functional.linear(self.act(torch.nn.functional.linear(rows, up)), down)


class NemotronHMoE(nn.Module):
    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate = DeepseekRouter(config, v3=True)
        latent = getattr(config, "moe_latent_size", None)
        width = latent or config.hidden_size
        self.experts = UngatedExperts(config.n_routed_experts, config.num_experts_per_tok, width,
                                      config.moe_intermediate_size, config.mlp_hidden_act, tp)
        self.shared_experts = UngatedMLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                                         config.mlp_hidden_act, bool(config.mlp_bias), tp)
        self.latent = latent is not None
        if self.latent:  # replicated
            self.fc1_latent_proj = Linear(config.hidden_size, latent, bias=bool(config.mlp_bias))
            self.fc2_latent_proj = Linear(latent, config.hidden_size, bias=bool(config.mlp_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        routed = self.experts.dispatch(self.fc1_latent_proj(x) if self.latent else x, weights, ids)
        if self.latent:
            routed = self.fc2_latent_proj(routed)
        return routed + self.shared_experts(x)


class NemotronHBlock(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.kind = config.layers_block_type[layer_idx]
        self.norm = Fp32WeightRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if self.kind == "linear_attention":
            self.mixer = MambaMixer2(config.hidden_size, *mamba_dims(config), config.chunk_size,
                                     config.layer_norm_epsilon, bool(config.mamba_proj_bias),
                                     bool(config.use_conv_bias), (config.time_step_min, float("inf")), tp)
        elif self.kind == "full_attention":
            bias = bool(getattr(config, "attention_bias", False))
            self.mixer = HybridAttention(config, layer_idx, AttentionOptions(qkv_bias=bias, o_bias=bias), tp)
        elif self.kind == "moe":
            self.mixer = NemotronHMoE(config, tp)
        elif self.kind == "mlp":
            self.mixer = UngatedMLP(config.hidden_size, config.intermediate_size, config.mlp_hidden_act,
                                    bool(config.mlp_bias), tp)
        else:
            raise ValueError(f"Nemotron-H layer kind {self.kind!r} is not supported (linear_attention, "
                             "full_attention, moe, mlp)")

    def forward(self, positions, x, cache, meta, backend):
        h = self.norm(x)
        if self.kind == "linear_attention":
            h = self.mixer(h, cache, meta)
        elif self.kind == "full_attention":
            h = self.mixer(positions, h, None, cache, meta, backend)
        else:
            h = self.mixer(h)
        return x + h


def mamba_dims(config) -> tuple[int, int, int, int, int]:
    return (config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size, config.n_groups,
            config.conv_kernel)


class NemotronHForCausalLM(_MoEWeights, RecurrentLM):
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
    backbone_names = True
    keep_float32 = (".mixer.gate.weight", ".mixer.gate.e_score_correction_bias")  # the router, as transformers

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        kinds = config.layers_block_type
        attention = kinds.count("full_attention")
        h = config.num_attention_heads
        if h % tp_size:
            raise ValueError(f"{h} attention heads do not split over tensor_parallel_size={tp_size}")
        ssm_dtype = getattr(config, "mamba_ssm_cache_dtype", None)
        return ModelGeometry(num_layers=attention, num_kv_heads=kv_heads_per_rank(config.num_key_value_heads, tp_size),
                             head_dim=getattr(config, "head_dim", None) or config.hidden_size // h,
                             sliding_windows=(None,) * attention, num_state_layers=kinds.count("linear_attention"),
                             state_shapes=mamba2_state_shapes(*mamba_dims(config), tp_size),
                             state_dtypes=(None, ssm_dtype if ssm_dtype in ("float32", "bfloat16", "float16")
                                           else None))

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.backbone.layers = nn.ModuleList(NemotronHBlock(config, i, tp) for i in range(config.num_hidden_layers))
        self.backbone.norm_f = Fp32WeightRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.init_lm_head(config, self.backbone.embeddings, tp)


    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        caches, states = iter(kv_caches), iter(self.states)
        for block in self.backbone.layers:
            cache = (next(states) if block.kind == "linear_attention" else
                     next(caches) if block.kind == "full_attention" else None)
            x = block(positions, x, cache, meta, backend)
        return self.backbone.norm_f(x)
