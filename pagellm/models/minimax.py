"""MiniMax-Text-01 / MiniMax-M1 (MiniMaxForCausalLM): lightning attention (linear attention with a fixed decay per
head: a recurrent state per sequence) with softmax attention layers among them, experts in every layer.

    lightning layer ("linear_attention"): q | k | v = SiLU(qkv_proj(x)) (per head), per head with slope s:
        S_t = exp(-s) S_{t-1} + v_t k_t^T      (head_dim x head_dim)
        o_t = S_t q_t  -> RMSNorm over all heads -> x sigmoid(output_gate(x)) -> out_proj
      s = base^(h + 1) x (1 - layer / (L - 1 + 1e-5) + 1e-5), base = 2^(-8 / heads): the decay depends on the head
      and the layer only. It is Mamba2's recurrence with dt = 1, A = -s, x = v, B = k, C = q, so prefill chunks take
      models/mamba.py's SSD scan and one-token steps the recurrent form.
    attention layer: GQA with RoPE
    every layer (the residual is the normalised input, DeepNorm-style):
        h = input_norm(x); x = alpha_attn h + beta_attn mixer(h)
        h = post_attention_norm(x); x = alpha_mlp h + beta_mlp experts(h)       (softmax top-k, renormalised)

Tensor parallel: heads split (lightning: whole heads of qkv_proj, their slopes; the norm over all heads
all-reduced), the experts as Mixtral's.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionMetadata
from pagellm.distributed.parallel import TPGroup
from pagellm.models.hybrid import HybridAttention, HybridForCausalLM
from pagellm.models.llama import AttentionOptions
from pagellm.models.mamba import Pieces, for_each_sequence, load_rows, pad_rows, ssd_scan, store_rows
from pagellm.models.moe import SparseMoeBlock, _MoEWeights
from pagellm.models.olmo2 import ShardedRMSNorm
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, RowParallelLinear, even_part


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    base = 1 / (2 ** (8 / num_heads))
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return base ** (torch.arange(num_heads) + 1) * factor


class LightningAttention(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        h = config.num_attention_heads
        d = getattr(config, "head_dim", None) or config.hidden_size // h
        if h % tp.size:
            raise ValueError(f"{h} lightning attention heads do not split over tensor_parallel_size={tp.size}")
        self.num_heads, self.head_dim, self.chunk_size = h // tp.size, d, config.block_size
        self.qkv_proj = ColumnParallelLinear.single(config.hidden_size, 3 * h * d, False, tp)  # per head: q | k | v
        self.output_gate = ColumnParallelLinear.single(config.hidden_size, h * d, False, tp)
        self.norm = ShardedRMSNorm(even_part(h * d, tp), config.rms_norm_eps, tp)
        self.out_proj = RowParallelLinear(h * d, config.hidden_size, bias=False, tp=tp)
        start = tp.rank * self.num_heads
        slopes = lightning_slopes(h, layer_idx, config.num_hidden_layers)[start:start + self.num_heads]
        self.register_buffer("neg_slope", -slopes.float(), persistent=False)  # A of the SSD form

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = meta.num_tokens
        qkv = torch.nn.functional.silu(self.qkv_proj(x[:t])).view(t, self.num_heads, 3 * self.head_dim).float()
        q, k, v = qkv.split(self.head_dim, dim=-1)
        o = torch.empty(t, self.num_heads, self.head_dim, dtype=torch.float32, device=x.device)
        for_each_sequence(meta, o, lambda idx, rows: self._step(q[idx], k[idx], v[idx], state, rows),
                          lambda p: self._chunks(q, k, v, state, p), state)
        o = self.norm(o.view(t, -1).to(x.dtype))
        o = torch.sigmoid(self.output_gate(x[:t])) * o
        return self.out_proj(pad_rows(o, x.shape[0]))

    def _step(self, q, k, v, state, rows):
        (s_state,) = state
        n, h, d = q.shape
        s = load_rows(s_state, rows)  # (n, H, D_v, D_k): updated in place
        s.mul_(torch.exp(self.neg_slope)[:, None, None])
        flat = s.view(n * h, d, d)
        flat.baddbmm_(v.reshape(n * h, d, 1), k.reshape(n * h, 1, d))
        store_rows(s_state, rows, s)
        return torch.bmm(flat, q.reshape(n * h, d, 1)).view(n, h, d)

    def _chunks(self, q, k, v, state, p: Pieces):
        (s_state,) = state
        q, k, v = (t[p.index] for t in (q, k, v))  # (B, L, H, D)
        dt = p.mask[..., None].float().expand(-1, -1, self.num_heads)  # 1 per real token; padding leaves the state
        y, final = ssd_scan(v, dt, self.neg_slope, k, q, s_state[p.rows].float(), self.chunk_size)
        s_state[p.rows] = final.to(s_state.dtype)
        return y


class MiniMaxLayer(nn.Module):
    def __init__(self, config, layer_idx: int, family: type[HybridForCausalLM], tp: TPGroup) -> None:
        super().__init__()
        self.is_recurrent = family.is_state_layer(config, layer_idx)
        if self.is_recurrent:
            self.self_attn = LightningAttention(config, layer_idx, tp)
            self.alpha, self.beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = HybridAttention(config, layer_idx, AttentionOptions(), tp)
            self.alpha, self.beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.mlp = SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                                  config.intermediate_size, config.hidden_act, True, tp=tp)
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.input_layernorm = family.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = family.norm_cls(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, rotary, cache, meta, backend):
        h = self.input_layernorm(x)
        if self.is_recurrent:
            out = self.self_attn(h, cache, meta)
        else:
            out = self.self_attn(positions, h, rotary, cache, meta, backend)
        h = self.post_attention_layernorm(h * self.alpha + out * self.beta)
        return h * self.mlp_alpha + self.mlp(h) * self.mlp_beta


class MiniMaxForCausalLM(_MoEWeights, HybridForCausalLM):
    decoder_layer = MiniMaxLayer
    skip_weights = HybridForCausalLM.skip_weights + (".slope_rate", ".query_decay", ".key_decay",
                                                     ".diagonal_decay")  # transformers' lightning buffers
    renames = ((".block_sparse_moe.", ".mlp."),)  # the original checkpoints' Mixtral-style names

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return config.layer_types[layer_idx] == "linear_attention"

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        h = config.num_attention_heads
        d = getattr(config, "head_dim", None) or config.hidden_size // h
        return ((h // tp_size, d, d),)

