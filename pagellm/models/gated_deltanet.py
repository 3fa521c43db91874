"""Gated DeltaNet, the linear-attention layer of Qwen3-Next: a recurrent state per sequence (models/mamba.py's
machinery: a causal convolution's last inputs and a matrix state per head) in place of a KV cache.

    x -> in_proj_qkvz (grouped per key head: q, k, v, z) and in_proj_ba (per key head: b, a)
    q | k | v -> causal depthwise conv1d (kernel K) -> SiLU; q, k L2-normalised, q x Kd^-0.5, each key head serving
                 Hv / Hk value heads
    per value head (state S: Kd x Vd), with beta = sigmoid(b) and log decay g = -exp(A_log) softplus(a + dt_bias):
        S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t           (the delta rule)
    o -> RMSNorm per head, x weight, x SiLU(z) -> out_proj

A sequence's one-token steps use that recurrence directly (all such sequences at once); a longer chunk is computed
in chunks of `chunk_size` tokens: inside a chunk the updates are solved as one triangular system (the UT transform),
across chunks the state carries over, from the sequence's state in its row.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionMetadata
from pagellm.distributed.parallel import TPGroup
from pagellm.models.mamba import Pieces, conv_pieces, conv_step, for_each_sequence, load_rows, pad_rows, store_rows
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, RowParallelLinear, even_part, parts_loader
from pagellm.models.weight_utils import CheckpointTensor, ckpt_narrow, set_weight_loader


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


SUB_CHUNK = 16  # channel_decayed_products: the blocks whose decays are computed pair by pair


def channel_decayed_products(xs: tuple[torch.Tensor, ...], k: torch.Tensor, cum: torch.Tensor,
                             sub: int | None = None) -> list[torch.Tensor]:
    """For each x (H, n, Kd): M[i, j] = sum_c x_i[c] k_j[c] exp(cum_i[c] - cum_j[c]) for j <= i, 0 above (H, n, n),
    cum (H, n, Kd) a cumulative log decay (non-increasing along n). Across blocks of `sub` tokens the decay factors
    through the block's first token r: exp(cum_i - cum_r) exp(cum_r - cum_j), both at most 1 for j before the block
    <= i (nothing overflows), so those products are matrix products; within a block the decays are taken pair by
    pair (H, sub, sub, Kd)."""
    h, n, _ = k.shape
    sub = sub or SUB_CHUNK
    out = [x.new_zeros(h, n, n) for x in xs]
    causal = torch.ones(sub, sub, dtype=torch.bool, device=k.device).tril()
    for a in range(0, n, sub):
        b = min(a + sub, n)
        ca, ka = cum[:, a:b], k[:, a:b]
        m = b - a
        pair = torch.exp((ca[:, :, None] - ca[:, None]).masked_fill(~causal[:m, :m, None], float("-inf")))
        if a:
            ref = ca[:, :1]
            k_before = k[:, :a] * torch.exp(ref - cum[:, :a])  # (H, a, Kd)
            to_ref = torch.exp(ca - ref)
        for x, o in zip(xs, out):
            o[:, a:b, a:b] = torch.einsum("hic,hjc,hijc->hij", x[:, a:b], ka, pair)
            if a:
                o[:, a:b, :a] = (x[:, a:b] * to_ref) @ k_before.transpose(1, 2)
    return out


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, float32: q / k (H, L, Kd) (normalised, q scaled), v (H, L, Vd), beta (H, L), the log decay g
    (H, L) per head (Gated DeltaNet) or (H, L, Kd) per key channel (Kimi Delta Attention), state (H, Kd, Vd) before
    the first token -> o (H, L, Vd) and the state after the last token."""
    out = torch.empty_like(v)
    g = g[..., None] if g.dim() == 2 else g  # (H, L, 1 or Kd)
    for s in range(0, q.shape[1], chunk_size):
        qc, kc, vc, gc, bc = (t[:, s:s + chunk_size] for t in (q, k, v, g, beta))
        n = qc.shape[1]
        cum = torch.cumsum(gc, dim=1)  # (H, n, 1 or Kd)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        kb = kc * bc[..., None]
        if cum.shape[-1] == 1:  # decay(i, j) = exp(cum_i - cum_j), one per head
            decay = torch.exp((cum - cum.transpose(1, 2)).masked_fill(~causal, float("-inf")))  # (H, n, n)
            system, attn = (kb @ kc.transpose(1, 2)) * decay, (qc @ kc.transpose(1, 2)) * decay
        else:  # one per key channel
            system, attn = channel_decayed_products((kb, qc), kc, cum)
        # (I + strictly lower (beta k k^T * decay)) [u | w] = [beta v | beta k exp(cum)]
        rhs = torch.cat((vc * bc[..., None], kb * torch.exp(cum)), dim=-1)
        sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u, w = sol[..., :vc.shape[-1]], sol[..., vc.shape[-1]:]
        v_new = u - w @ state  # (H, n, Vd): what the state does not predict yet
        out[:, s:s + n] = (qc * torch.exp(cum)) @ state + attn @ v_new
        last = cum[:, -1:]  # (H, 1, 1 or Kd)
        state = state * torch.exp(last).transpose(1, 2) + (kc * torch.exp(last - cum)).transpose(1, 2) @ v_new
    return out, state


class HeadRMSNormGated(nn.Module):
    """RMSNorm over each head's channels, x weight (in the input's dtype), then x SiLU(gate) (float32). Kimi Delta
    Attention's (sigmoid_gate): the weight and a sigmoid gate applied in float32, on the output rounded to the
    input's dtype first."""

    def __init__(self, dim: int, eps: float, sigmoid_gate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.sigmoid_gate = eps, sigmoid_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x32 = x.to(dtype).float() if self.sigmoid_gate else x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.sigmoid_gate:
            return (self.weight.float() * x32 * torch.sigmoid(gate.float())).to(dtype)
        out = (self.weight * x32.to(dtype)) * torch.nn.functional.silu(gate.float())
        return out.to(dtype)


def gated_deltanet_state_shapes(num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                                conv_kernel: int, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
    """One sequence's state in one layer on one rank: the convolution's last K - 1 inputs of q | k | v, and S per
    value head."""
    if num_k_heads % tp_size or num_v_heads % tp_size:
        raise ValueError(f"{num_k_heads} key heads and {num_v_heads} value heads of the Gated DeltaNet layers do not "
                         f"split over tensor_parallel_size={tp_size}")
    nk, nv = num_k_heads // tp_size, num_v_heads // tp_size
    return (2 * nk * head_k_dim + nv * head_v_dim, conv_kernel - 1), (nv, head_k_dim, head_v_dim)


def linear_attention_state_shapes(config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
    """The state shapes of a config's Gated DeltaNet layers (transformers' linear_* fields: Qwen3-Next, Qwen3.5,
    OLMo Hybrid)."""
    return gated_deltanet_state_shapes(config.linear_num_key_heads, config.linear_num_value_heads,
                                       config.linear_key_head_dim, config.linear_value_head_dim,
                                       config.linear_conv_kernel_dim, tp_size)


class DeltaRuleLayer(nn.Module):
    """The recurrence Gated DeltaNet and Kimi Delta Attention share, from q | k | v (T, conv_dim) in the convolution's
    channel order: a causal depthwise convolution (its last K - 1 inputs a state per sequence), SiLU; q and k
    L2-normalised (q x Kd^-0.5), each key head serving Hv / Hk value heads; then the delta rule with a log decay per
    value head (g: T x Hv x 1) or per key channel (T x Hv x Kd). One-token steps run the recurrence, longer pieces
    the chunked form (delta_rule_chunked)."""

    def init_recurrence(self, nk: int, nv: int, dk: int, dv: int, conv_kernel: int, chunk_size: int,
                        conv_parts: list, conv_shards: frozenset | None) -> None:
        """This rank's nk key / nv value heads; conv_parts: the convolution's q, k, v parts (conv_shards: loaded one
        at a time, as checkpoints storing q_conv1d, k_conv1d and v_conv1d apart)."""
        self.nk, self.nv, self.dk, self.dv = nk, nv, dk, dv
        self.key_dim, self.value_dim = nk * dk, nv * dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.chunk_size = chunk_size
        self.conv1d = nn.Module()  # checkpoint name: conv1d.weight (conv_dim, 1, K), no bias
        self.conv1d.weight = nn.Parameter(torch.empty(self.conv_dim, 1, conv_kernel))
        self.conv_parts = conv_parts
        set_weight_loader(self.conv1d.weight, self.load_conv, conv_shards)

    def load_conv(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        """The convolution over q | k | v: whole (conv1d), or one part at a time (q_conv1d, k_conv1d, v_conv1d:
        shards 0-2)."""
        if shard_id is None:
            parts_loader(self.conv_parts)(param, tensor)
            return
        offset = sum(p.size for p in self.conv_parts[:shard_id])
        part = self.conv_parts[shard_id]
        parts_loader([part])(param[offset:offset + part.size], tensor)

    def recur(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
              meta: AttentionMetadata) -> torch.Tensor:
        """mixed (T, conv_dim), g (T, Hv, 1 or Kd), beta (T, Hv) float32 -> o (T, Hv, Vd) float32."""
        o = torch.empty(meta.num_tokens, self.nv, self.dv, dtype=torch.float32, device=mixed.device)
        for_each_sequence(meta, o, lambda idx, rows: self._step(mixed[idx], g[idx], beta[idx], state, rows),
                          lambda p: self._chunks(mixed, g, beta, state, p), state)
        return o

    def _qkv(self, conv: torch.Tensor):
        """Convolved q | k | v (n, conv_dim) -> q, k (n, Hv, Kd) normalised (q scaled), v (n, Hv, Vd); float32."""
        n = conv.shape[0]
        q, k, v = torch.nn.functional.silu(conv.float()).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = self.nv // self.nk
        q = l2_normalize(q.view(n, self.nk, self.dk)).repeat_interleave(r, dim=1) * self.dk ** -0.5
        k = l2_normalize(k.view(n, self.nk, self.dk)).repeat_interleave(r, dim=1)
        return q, k, v.view(n, self.nv, self.dv)

    def _step(self, mixed, g, beta, state, rows):
        conv_state, s_state = state
        q, k, v = self._qkv(conv_step(mixed, conv_state, rows, self.conv1d.weight, None))
        n, h = beta.shape
        s = load_rows(s_state, rows)  # (n, Hv, Kd, Vd): updated in place
        s.mul_(torch.exp(g)[..., None])  # g (n, Hv, 1 or Kd): a decay per head or per key channel
        flat = s.view(n * h, self.dk, self.dv)
        delta = (v.reshape(n * h, 1, self.dv) - torch.bmm(k.reshape(n * h, 1, self.dk), flat)) * beta.reshape(-1, 1, 1)
        flat.baddbmm_(k.reshape(n * h, self.dk, 1), delta)
        store_rows(s_state, rows, s)
        return torch.bmm(q.reshape(n * h, 1, self.dk), flat).view(n, h, self.dv)

    def _chunks(self, mixed, g, beta, state, p: Pieces):
        """Pieces of several sequences -> o (B, L, Hv, Vd); the sequences fold into the heads."""
        conv_state, s_state = state
        nb, length = p.index.shape
        conv = conv_pieces(mixed, conv_state, p, self.conv1d.weight, None)
        q, k, v = self._qkv(conv.reshape(nb * length, -1))
        heads = lambda t: t.view(nb, length, self.nv, -1).permute(0, 2, 1, 3).reshape(nb * self.nv, length, -1)  # noqa: E731
        keep = p.mask[..., None]  # padding: no decay, no update (the state stays as it is)
        beta = (beta[p.index] * keep).permute(0, 2, 1).reshape(nb * self.nv, length)
        g = (g[p.index] * keep[..., None]).permute(0, 2, 1, 3).reshape(nb * self.nv, length, -1)
        o, final = delta_rule_chunked(heads(q), heads(k), heads(v), g, beta,
                                      s_state[p.rows].float().view(nb * self.nv, self.dk, self.dv), self.chunk_size)
        s_state[p.rows] = final.view(nb, self.nv, self.dk, self.dv).to(s_state.dtype)
        return o.view(nb, self.nv, length, self.dv).transpose(1, 2)


class GatedDeltaNet(DeltaRuleLayer):
    """Tensor parallel: each rank holds num_k_heads / tp key heads and num_v_heads / tp value heads (their
    projections, conv channels and decay parameters; Qwen3-Next's grouped projections split as whole key-head
    groups), out_proj row-parallel."""

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_kernel: int, eps: float, chunk_size: int = 64, layout: str = "grouped", beta_scale: float = 1.0,
                 tp: TPGroup = SINGLE) -> None:
        """layout: how the checkpoint stores the input projections. "grouped" (Qwen3-Next): in_proj_qkvz and
        in_proj_ba, grouped per key head. "split" (Qwen3.5): in_proj_qkv (q | k | v, the convolution's channel
        order), in_proj_z, in_proj_b and in_proj_a, packed here in one `in_proj` (shards "qkv", 3, 4, 5).
        "separate" (OLMo Hybrid): q, k, v, z, b and a apart (shards 0-5 of `in_proj`). beta_scale: beta =
        beta_scale x sigmoid(b) (OLMo Hybrid: 2, eigenvalues down to -1)."""
        super().__init__()
        gated_deltanet_state_shapes(num_k_heads, num_v_heads, head_k_dim, head_v_dim, conv_kernel, tp.size)  # splits
        self.split = layout != "grouped"
        self.beta_scale = beta_scale
        key, value = even_part(num_k_heads * head_k_dim, tp), even_part(num_v_heads * head_v_dim, tp)
        self.init_recurrence(num_k_heads // tp.size, num_v_heads // tp.size, head_k_dim, head_v_dim, conv_kernel,
                             chunk_size, [key, key, value], frozenset((0, 1, 2)) if layout == "separate" else None)
        heads = even_part(num_v_heads, tp)
        if self.split:
            self.in_proj = ColumnParallelLinear(hidden_size, [key, key, value, value, heads, heads], bias=False)
            if layout == "split":
                set_weight_loader(self.in_proj.weight, self.load_in_proj, frozenset(("qkv", 3, 4, 5)))
        else:
            self.in_proj_qkvz = ColumnParallelLinear.single(hidden_size, 2 * (key.full_size + value.full_size), False,
                                                            tp)
            self.in_proj_ba = ColumnParallelLinear.single(hidden_size, 2 * num_v_heads, False, tp)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(torch.zeros(self.nv))
        for p in (self.dt_bias, self.A_log):
            set_weight_loader(p, parts_loader([heads]))
        self.norm = HeadRMSNormGated(head_v_dim, eps)
        self.out_proj = RowParallelLinear(num_v_heads * head_v_dim, hidden_size, bias=False, tp=tp)

    def load_in_proj(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        """in_proj_qkv ("qkv": q | k | v rows, packed parts 0-2), in_proj_z / _b / _a (parts 3-5)."""
        layer = self.in_proj
        if shard_id != "qkv":
            layer.load_part(param, tensor, shard_id)
            return
        start = 0
        for i in range(3):
            size = layer.parts[i].full_size
            layer.load_part(param, ckpt_narrow(tensor, 0, start, size), i)
            start += size

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = meta.num_tokens
        mixed, z, b, a = self._project(x[:t])
        beta = torch.sigmoid(b.reshape(t, self.nv).float())
        if self.beta_scale != 1.0:
            beta = beta * self.beta_scale
        g = -torch.exp(self.A_log.float()) * torch.nn.functional.softplus(a.reshape(t, self.nv).float()
                                                                           + self.dt_bias.float())
        o = self.recur(mixed, g[..., None], beta, state, meta)
        o = self.norm(o, z.reshape(t, self.nv, self.dv), x.dtype).reshape(t, self.value_dim)
        return self.out_proj(pad_rows(o, x.shape[0]))

    def _project(self, x: torch.Tensor):
        """x (T, hidden) -> q | k | v in the convolution's channel order (T, conv_dim), z, b and a."""
        t = x.shape[0]
        if self.split:
            q, k, v, z, b, a = self.in_proj.split(self.in_proj(x))
            return torch.cat((q, k, v), dim=-1), z, b, a
        r = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).view(t, self.nk, -1)  # per key head: q, k, r value heads' v, then z
        q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = self.in_proj_ba(x).view(t, self.nk, 2 * r).split([r, r], dim=-1)
        return torch.cat((q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)), dim=-1), z, b, a
