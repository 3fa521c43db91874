"""DeepSeek-V3.2 (DeepseekV32ForCausalLM) and GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3 with DeepSeek Sparse
Attention (DSA). Each query attends to at most index_topk (2048) earlier tokens, those a lightweight indexer scores
highest:

    indexer keys  k_i = RoPE(LayerNorm(wk(x_i)))                      (index_head_dim, one per token)
    queries       q_t,h = RoPE(wq_b(RMSNorm(q_a_proj(x_t))))          (index_n_heads of index_head_dim)
    score(t, i) = sum_h w_t,h relu(q_t,h . k_i / sqrt(D)),  w_t = weights_proj(x_t) / sqrt(index_n_heads)
    query t attends (MLA, models/deepseek.py) to the index_topk causal tokens of highest score

RoPE turns the first qk_rope_head_dim features: in halves (V3.2) or in interleaved pairs (GLM-5). GLM-5's layers
marked "shared" in indexer_types have no indexer and reuse the selection of the last layer that has one.

The indexer keys live in the latent cache row beside each token's [c, k_pe]: a row is [c, k_pe, k_idx]
(kv_lora_rank + qk_rope_head_dim + index_head_dim: 704 numbers for V3.2, 22% more than V3's 576), and the absorbed
query is padded with zeros over k_idx, so the paged attention backends, prefix caching, preemption and tensor
parallelism (the latent cache and the indexer are replicated on every rank) work on it unchanged. A sequence whose
context holds no more than index_topk tokens selects all of them: dense attention, computed by the backend. Longer
ones are computed again here: the sequence's rows are gathered from the cache, the scores taken, and its queries
attend to their selection (plain torch, queries in groups; no sparse kernel).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache, from_cache, gather_context
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.deepseek import DeepseekV3ForCausalLM, MLAttention, softmax_scale
from pagellm.models.layers import Attention, RotaryEmbedding
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear

SCORE_BUDGET = 1 << 26  # float32 scores (queries x index heads x keys) computed at once


class DSAIndexer(nn.Module):
    """Replicated on every rank (its scores sum over all index heads)."""

    def __init__(self, config, interleaved_rope: bool) -> None:
        super().__init__()
        self.heads, self.dim, self.rope = config.index_n_heads, config.index_head_dim, config.qk_rope_head_dim
        self.wq_b = ColumnParallelLinear.single(config.q_lora_rank, self.heads * self.dim, False)
        self.wk = ColumnParallelLinear.single(config.hidden_size, self.dim, False)
        self.k_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.weights_proj = ColumnParallelLinear.single(config.hidden_size, self.heads, False)
        order = torch.cat((torch.arange(0, self.rope, 2), torch.arange(1, self.rope, 2), torch.arange(self.rope,
                                                                                                      self.dim)))
        self.register_buffer("rope_order", order if interleaved_rope else None, persistent=False)

    def _rope(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        if self.rope_order is not None:  # interleaved pairs, reordered evens-then-odds (as MLA's)
            x = x.index_select(-1, self.rope_order)
        return rotary.rotate(positions, x.contiguous())

    def keys(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        return self._rope(positions, self.k_norm(self.wk(x))[:, None], rotary)[:, 0]  # (T, D)

    def queries(self, positions: torch.Tensor, x: torch.Tensor, q_in: torch.Tensor,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, heads, D) queries and (T, heads) weights, float32."""
        q = self._rope(positions, self.wq_b(q_in).view(x.shape[0], self.heads, self.dim), rotary)
        w = self.weights_proj(x).float() * self.heads ** -0.5
        return q.float(), w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, first_pos: int, topk: int) -> torch.Tensor:
        """Queries at positions first_pos.. (L, heads, D), their weights (L, heads), the context's keys (n, D)
        -> (L, n) the keys each query attends to: its topk causal keys of highest score."""
        n = keys.shape[0]
        q_pos = torch.arange(first_pos, first_pos + q.shape[0], device=q.device)[:, None]
        causal = torch.arange(n, device=q.device)[None] <= q_pos
        scores = torch.einsum("lhd,nd->lhn", q, keys.float()).mul_(self.dim ** -0.5).relu_()
        index = torch.einsum("lh,lhn->ln", w, scores).masked_fill_(~causal, float("-inf"))
        chosen = torch.zeros_like(causal).scatter_(1, index.topk(min(topk, n), dim=-1).indices, True)
        return chosen & causal


class DSAttention(MLAttention):
    """MLA whose cache rows carry the indexer's keys; `indexer` False: a GLM-5 "shared" layer, which reuses the
    selection of the last layer that has one (AttentionMetadata.sparse_selection)."""

    host_sync_reason = "sparse attention (DSA) chooses each step's path from the sequences' lengths on the host"

    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE, indexer: bool = True,
                 interleaved_index_rope: bool = False) -> None:
        super().__init__(config, layer_idx, tp)
        if self.q_lora is None:
            raise ValueError("DeepSeek Sparse Attention needs q_lora_rank (the indexer reads the low-rank query)")
        self.topk, self.index_dim = config.index_topk, config.index_head_dim
        self.width = self.rank + self.rope + self.index_dim
        self.attn = Attention(self.num_heads, self.width, 1, softmax_scale(config))
        self.indexer = DSAIndexer(config, interleaved_index_rope) if indexer else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q_in = self.query_input(x)
        q_full, kv = self.latent(positions, x, q_in, rotary)
        keys = (self.indexer.keys(positions, x, rotary) if self.indexer is not None
                else kv.new_zeros(t, self.index_dim))
        row = torch.cat((kv, keys[:, None].to(kv.dtype)), dim=-1)  # (T, 1, width)
        q = torch.cat((q_full, q_full.new_zeros(t, self.num_heads, self.index_dim)), dim=-1)  # (T, H, width)
        out = self.attn(q, row, row, kv_cache, meta, backend).view(t, self.num_heads, self.width)
        longer = [i for i, n in enumerate(meta.seq_lens_cpu) if n > self.topk]
        if longer:
            self.sparse(out, q, positions, x, q_in, rotary, kv_cache, meta, longer)
        return self.finish(x, out)

    def sparse(self, out, q, positions, x, q_in, rotary, kv_cache, meta: AttentionMetadata, seqs: list[int]) -> None:
        """Recompute the rows of the sequences longer than index_topk: each query over its selection."""
        if self.indexer is not None:
            iq, iw = self.indexer.queries(positions, x, q_in, rotary)
            meta.sparse_selection = {}
        elif meta.sparse_selection is None:
            raise RuntimeError("a shared DSA layer ran before any layer with an indexer")
        params, qsl = self.attn.params, meta.query_start_loc_cpu
        for i in seqs:
            s, e, n = qsl[i], qsl[i + 1], meta.seq_lens_cpu[i]
            rows, _ = gather_context(kv_cache, meta.block_tables[i], 0, n)  # (n, 1, width)
            rows = from_cache(rows, q.dtype, params.k_scale)
            if self.indexer is not None:
                step = max(1, SCORE_BUDGET // (self.indexer.heads * n))
                chosen = torch.cat([self.indexer.select(iq[a:min(a + step, e)], iw[a:min(a + step, e)],
                                                        rows[:, 0, self.rank + self.rope:], n - (e - s) + a - s,
                                                        self.topk) for a in range(s, e, step)])
                meta.sparse_selection[i] = chosen
            else:
                chosen = meta.sparse_selection[i]
            kv = rows.transpose(0, 1)[None].expand(1, self.num_heads, n, self.width)  # (1, H, n, width)
            qi = q[s:e].transpose(0, 1)[None]  # (1, H, L, width)
            o = torch.nn.functional.scaled_dot_product_attention(qi, kv, kv, attn_mask=chosen, scale=params.scale)
            out[s:e] = o[0].transpose(0, 1)


class DeepseekV32ForCausalLM(DeepseekV3ForCausalLM):
    """DeepSeek-V3.2: DeepSeek-V3 with sparse attention (the indexer's RoPE in halves)."""

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        """The latent row with the indexer's keys: kv_lora_rank + qk_rope_head_dim + index_head_dim."""
        g = super().geometry(config, tp_size)
        return dataclasses.replace(g, head_dim=g.head_dim + config.index_head_dim)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return DSAttention(config, layer_idx, tp)


class GlmMoeDsaForCausalLM(DeepseekV32ForCausalLM):
    """GLM-5: the same layers, the indexer's RoPE in interleaved pairs, indexers only in the layers indexer_types
    marks "full" (the "shared" ones reuse the previous selection)."""

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        types = getattr(config, "indexer_types", None)
        full = types is None or layer_idx >= len(types) or types[layer_idx] == "full"  # (the MTP layer: its own)
        return DSAttention(config, layer_idx, tp, indexer=full,
                           interleaved_index_rope=True)
