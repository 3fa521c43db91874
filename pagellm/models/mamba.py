"""Mamba2 mixer layers of hybrid models (Granite 4.0-H, Bamba): a selective state-space layer with a per-sequence
recurrent state instead of a KV cache.

    x (T, hidden) -> in_proj -> gate z (d_inner) | xBC (d_inner + 2 G N) | dt (H)
    xBC -> causal depthwise conv1d (kernel K, over the sequence's last K - 1 inputs too) -> SiLU -> x | B | C
    dt = softplus(dt + dt_bias) (clamped to time_step_limit in the chunked form only, as mamba_ssm's and transformers'
         one-token step does not clamp), A = -exp(A_log)
    per head h (P = head_dim channels, N = state size, heads share B / C within each of G groups):
        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T       (P x N)
        y_t = S_t C_t + D x_t
    y -> RMSNorm(y * SiLU(z)) per group of d_inner / G channels -> out_proj

State per sequence and layer (ModelGeometry.state_shapes): the convolution's last K - 1 inputs (conv_dim, K - 1) and
S (H, P, N), held by the worker in one row per batch row (meta.state_rows) and zeroed when a sequence takes its row.
A sequence with one token this step (decode, or a one-token chunk) takes the recurrent form, all such sequences at
once; a longer chunk takes the chunked form (SSD: within chunks of `chunk_size` tokens the recurrence is a masked
product, as attention; between chunks the state carries over), starting from the sequence's state, so prompts split
into prefill chunks give the same result as whole ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagellm.attention.backend import AttentionMetadata
from pagellm.distributed.parallel import TPGroup
from pagellm.models.layers import RMSNorm
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    Part,
    RowParallelLinear,
    even_part,
    parts_loader,
)
from pagellm.models.weight_utils import set_weight_loader


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over B sequences' L tokens each, in float32, chunk by chunk.

    x (B, L, H, P), dt (B, L, H) (after softplus; 0 at padding, which then leaves the state as it is), a (H,)
    (negative), b / c (B, L, H, N) (per head), state (B, H, P, N): the states before the first token -> y (B, L, H,
    P) without the D term, and the states after the last token.
    """
    nb, length, heads = dt.shape
    if nb > 1 and nb * min(chunk_size, length) ** 2 * heads > SCAN_BUDGET:  # (t, u, H) per sequence, a few times
        return _by_batch(ssd_scan, max(1, SCAN_BUDGET // (min(chunk_size, length) ** 2 * heads)), x, dt, a, b, c,
                         state, chunk_size)
    y = torch.empty_like(x)
    for s in range(0, x.shape[1], chunk_size):
        xs, dts, bs, cs = (t[:, s:s + chunk_size] for t in (x, dt, b, c))
        n = xs.shape[1]
        cum = torch.cumsum(dts * a, dim=1)  # (B, n, H): log of the decay from the chunk's start to each token
        seg = cum[:, :, None, :] - cum[:, None, :, :]  # (B, t, u, H): log decay from token u to token t
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(seg.masked_fill(~causal[..., None], float("-inf")))
        xdt = xs * dts[..., None]  # (B, n, H, P)
        scores = torch.einsum("zthn,zuhn->ztuh", cs, bs) * decay
        y[:, s:s + n] = (torch.einsum("ztuh,zuhp->zthp", scores, xdt)
                         + torch.einsum("zthn,zhpn->zthp", cs, state) * torch.exp(cum)[..., None])
        last = cum[:, -1]  # (B, H)
        state = (state * torch.exp(last)[:, :, None, None]
                 + torch.einsum("zuh,zuhn,zuhp->zhpn", torch.exp(last[:, None] - cum), bs, xdt))
    return y, state


# Numbers in one of a scan's per-chunk intermediates (the pairwise decays) for all the sequences of a call, at most:
# more sequences are scanned a few at a time.
SCAN_BUDGET = 1 << 24


def _by_batch(scan, size: int, x, dt, a, b, c, state, chunk_size):
    """scan over the sequences `size` at a time."""
    parts = [scan(x[i:i + size], dt[i:i + size], a, b[i:i + size], c[i:i + size], state[i:i + size], chunk_size)
             for i in range(0, x.shape[0], size)]
    return torch.cat([y for y, _ in parts]), torch.cat([s for _, s in parts])


def load_rows(t: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """The states of one-token sequences in float32, to update in place: a copy (gathered rows), or, when the rows
    are one contiguous ascending range (a slice; meta.recurrent_plan), float32 state itself."""
    return t[rows].float()


def store_rows(t: torch.Tensor, rows: torch.Tensor | slice, s: torch.Tensor) -> None:
    """Write back what load_rows gave, once updated (nothing to do when it was the state itself)."""
    if isinstance(rows, slice):
        if s.data_ptr() != t[rows].data_ptr():
            t[rows] = s
    else:
        t.index_copy_(0, rows, s.to(t.dtype))


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, rows: torch.Tensor | slice, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The causal depthwise convolution at one new input of each of n sequences: x (n, C), conv_state (rows, C,
    K - 1) holding each sequence's last K - 1 inputs (updated), weight (C, 1, K) -> (n, C), before the activation."""
    window = torch.cat((conv_state[rows], x[:, :, None].to(conv_state.dtype)), dim=-1)  # (n, C, K)
    conv_state[rows] = window[..., 1:]
    out = (window * weight[:, 0]).sum(-1)
    return out if bias is None else out + bias


@dataclass
class Pieces:
    """Multi-token chunks of B sequences computed together (one call of a mixer's chunked form), each padded at its
    end to the longest, L tokens. A padding position repeats an index of its own piece: its output is dropped, and
    the mixer makes it leave the state as it is (dt, beta = 0)."""

    index: torch.Tensor  # (B, L) the tokens' indices in the step
    mask: torch.Tensor  # (B, L) real tokens
    lengths: torch.Tensor  # (B,) tokens per piece
    rows: torch.Tensor  # (B,) the sequences' state rows
    tokens: torch.Tensor  # (real tokens,) index[mask]

    @classmethod
    def build(cls, pieces: list[tuple[int, int, int]], device: torch.device) -> Pieces:
        """pieces: (start, end, state row) each."""
        start, end, rows = torch.tensor(pieces).unbind(1)
        lengths = end - start
        offsets = torch.arange(int(lengths.max()))
        mask = offsets < lengths[:, None]
        index = torch.minimum(start[:, None] + offsets, end[:, None] - 1)
        return cls(*(t.to(device) for t in (index, mask, lengths, rows, index[mask])))


def conv_pieces(x: torch.Tensor, conv_state: torch.Tensor, p: Pieces, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The same over the step's inputs x (T, C) of several pieces -> (B, L, C); each piece's state row keeps its
    last K - 1 inputs (padding never reaches them: the convolution is causal)."""
    k = weight.shape[-1]
    inputs = torch.cat((conv_state[p.rows], x[p.index].transpose(1, 2).to(conv_state.dtype)), dim=-1)  # (B, C, K-1+L)
    keep = p.lengths[:, None] + torch.arange(k - 1, device=x.device)  # (B, K - 1): after each piece's last input
    conv_state[p.rows] = inputs.gather(2, keep[:, None, :].expand(-1, inputs.shape[1], -1))
    out = torch.nn.functional.conv1d(inputs.to(weight.dtype), weight, groups=weight.shape[0]).transpose(1, 2)
    return out if bias is None else out + bias


def for_each_sequence(meta: AttentionMetadata, out: torch.Tensor, step, chunks,
                      state: tuple[torch.Tensor, ...] = ()) -> None:
    """out[rows of the step's tokens] from a recurrent layer: `step(token index (n,), state rows: (n,) or a slice)`
    for every sequence with one token this step (decode, or a one-token chunk), all at once; `chunks(Pieces)` ->
    (B, L, ...) for the longer chunks, several at once (grouped by length so that padding stays under half the
    work). A sequence's state may be saved at points of its chunk (meta.state_saves: prefix caching's checkpoints,
    speculative decoding's state after each draft): the chunk is then computed in pieces between them, one round
    per piece (a one-token piece with the one-token sequences of its round), and after each round the state rows
    are copied into the save rows of `state`, this layer's state tensors. The plan is worked out once per step
    (meta.recurrent_plan): its index tensors go to the device once, not once per layer."""
    if meta.recurrent_plan is None:
        meta.recurrent_plan = _recurrent_plan(meta, out.device)
    for idx, state_rows, groups, saves in meta.recurrent_plan:
        if idx is not None:
            out[idx] = step(idx, state_rows)
        for p in groups:
            out[p.tokens] = chunks(p)[p.mask]
        _copy_rows(state, saves)


def _copy_rows(state: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor | slice, torch.Tensor | slice] | None) -> None:
    if rows is not None:
        src, dst = rows
        for t in state:
            if isinstance(src, slice):  # one strided copy, no gather (a speculative step's saves)
                t[dst].copy_(t[src])
            else:
                t[dst] = t[src]


def _recurrent_plan(meta: AttentionMetadata, device: torch.device):
    """[(token index of the round's one-token pieces, their state rows, [Pieces] of its longer ones, state copies)]
    one per round; a copy is (state rows, save rows)."""
    qsl, rows, saves = meta.query_start_loc_cpu, meta.state_rows_cpu, meta.state_saves or {}
    rounds: list[list[tuple[int, int, int, list[int]]]] = [[]]  # round r: each sequence's r-th piece
    for i in range(len(rows)):
        start, end = qsl[i], qsl[i + 1]
        if i not in saves:
            rounds[0].append((start, end, rows[i], []))
            continue
        cuts: dict[int, list[int]] = {}  # chunk offset -> the rows its state is saved to there
        for offset, save_row in saves.get(i, ()):
            cuts.setdefault(qsl[i] + offset, []).append(save_row)
        cuts.setdefault(end, [])
        for r, cut in enumerate(sorted(cuts)):
            if r == len(rounds):
                rounds.append([])
            rounds[r].append((start, cut, rows[i], cuts[cut]))
            start = cut
    return [_round(pieces, device) for pieces in rounds]


def _round(pieces: list[tuple[int, int, int, list[int]]], device: torch.device):
    # The one-token pieces in the order of their rows: when the rows are one range (InputBatch hands out the lowest
    # free row, so the live rows of a decode step usually are), the step reads and updates the states as views.
    single = sorted((p for p in pieces if p[1] - p[0] == 1), key=lambda p: p[2])
    idx = state_rows = None
    if single:
        idx = torch.tensor([p[0] for p in single], device=device)
        first = single[0][2]
        if single[-1][2] - first == len(single) - 1:
            state_rows = slice(first, first + len(single))
        else:
            state_rows = torch.tensor([p[2] for p in single], device=device)
    longer = [(s, e, row) for s, e, row, _ in pieces if e - s > 1]
    copies = [(row, save) for _, _, row, save_rows in pieces for save in save_rows]
    return idx, state_rows, [Pieces.build(g, device) for g in _by_length(longer)], _rows_pair(copies, device)


def _by_length(pieces: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Pieces grouped, longest first, so that each group's padded size is at most twice its real tokens."""
    groups: list[list[tuple[int, int, int]]] = []
    real = 0
    for s, e, row in sorted(pieces, key=lambda p: p[0] - p[1]):
        if groups and (len(groups[-1]) + 1) * (groups[-1][0][1] - groups[-1][0][0]) <= 2 * (real + e - s):
            groups[-1].append((s, e, row))
            real += e - s
        else:
            groups.append([(s, e, row)])
            real = e - s
    return groups


def _rows_pair(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor | slice, ...] | None:
    """(source rows, destination rows) of state copies: slices when both are evenly spaced (consecutive sources:
    the state rows of sequences in row order; destinations k apart: their k rows of speculative saves), else
    index tensors."""
    if not pairs:
        return None
    pairs = sorted(pairs)
    src, dst = [a for a, _ in pairs], [b for _, b in pairs]
    step = dst[1] - dst[0] if len(dst) > 1 else 1
    if _spaced(src, 1) and step > 0 and _spaced(dst, step):
        return slice(src[0], src[-1] + 1), slice(dst[0], dst[-1] + 1, step)
    return torch.tensor(src, device=device), torch.tensor(dst, device=device)


def _spaced(rows: list[int], step: int) -> bool:
    return all(b - a == step for a, b in zip(rows, rows[1:]))


def pad_rows(out: torch.Tensor, rows: int) -> torch.Tensor:
    """out (T, ...) with zero rows appended up to `rows` (the batch's padding rows)."""
    return out if out.shape[0] == rows else torch.cat((out, out.new_zeros(rows - out.shape[0], *out.shape[1:])))


def mamba2_groups(num_heads: int, n_groups: int, tp_size: int) -> int:
    """Groups of B / C one rank holds: its share when they split over the ranks, else the one group its heads use."""
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} Mamba heads do not split over tensor_parallel_size={tp_size}")
    if n_groups % tp_size == 0:
        return n_groups // tp_size
    if tp_size % n_groups == 0:
        return 1
    raise ValueError(f"{n_groups} Mamba groups neither split over nor divide tensor_parallel_size={tp_size}")


def mamba2_state_shapes(num_heads: int, head_dim: int, state_size: int, n_groups: int, conv_kernel: int,
                        tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
    """One sequence's state in one Mamba2 layer on one rank: the last K - 1 convolution inputs, and the SSM state."""
    heads, groups = num_heads // tp_size, mamba2_groups(num_heads, n_groups, tp_size)
    return (heads * head_dim + 2 * groups * state_size, conv_kernel - 1), (heads, head_dim, state_size)


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * SiLU(z), over groups of `group_size` channels, in float32 (Mamba2's norm before out_proj).
    Under tensor parallelism a rank holds whole groups, or (fewer groups than ranks) part of one group, `group`,
    whose sum of squares is then all-reduced. Falcon-H1's variant (falcon=True) multiplies by the weight in float32
    and, with norm_before_gate, by SiLU(z) after the norm."""

    def __init__(self, part: Part, group_size: int, eps: float, tp: TPGroup = SINGLE, group: int | None = None,
                 n_groups: int = 1, falcon: bool = False, norm_before_gate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(part.size))
        set_weight_loader(self.weight, parts_loader([part]))
        self.group_size, self.eps, self.tp = group_size, eps, tp
        self.group, self.n_groups = group, n_groups  # group: the one group this rank shares with others
        self.falcon, self.norm_before_gate = falcon, norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = torch.nn.functional.silu(z.float())
        h = y.float() if self.norm_before_gate else y.float() * gate
        if self.group is None:
            g = h.view(*h.shape[:-1], -1, self.group_size)
            h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).view(h.shape)
        else:
            sums = h.new_zeros(h.shape[0], self.n_groups)  # each rank fills its group's column; the all-reduce adds
            sums[:, self.group] = h.pow(2).sum(-1)
            h = h * torch.rsqrt(self.tp.all_reduce(sums)[:, self.group, None] / self.group_size + self.eps)
        if not self.falcon:
            return self.weight * h.to(z.dtype)
        h = self.weight * h
        return (h * gate if self.norm_before_gate else h).to(z.dtype)


class MambaMixer2(nn.Module):
    """Tensor parallel: each rank holds num_heads / tp heads (their x, z, dt, conv channels and SSM parameters) and
    the B / C groups they use (split, or replicated when there are fewer groups than ranks); out_proj is
    row-parallel (one all-reduce), as is the gated norm's sum of squares when a group spans ranks."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, state_size: int, n_groups: int,
                 conv_kernel: int, chunk_size: int, eps: float, proj_bias: bool = False, conv_bias: bool = True,
                 time_step_limit: tuple[float, float] = (0.0, float("inf")), tp: TPGroup = SINGLE,
                 in_multiplier: float = 1.0, proj_multipliers: tuple[float, ...] | None = None,
                 norm: str = "gated") -> None:
        """Falcon-H1's variants: the input x in_multiplier, in_proj's five parts (z, x, B, C, dt) each x its
        multiplier (proj_multipliers), and `norm`: "gated" (Mamba2's), "falcon", "falcon_before_gate" (the norm
        before the gate) or "none" (y x SiLU(z))."""
        super().__init__()
        self.in_multiplier = in_multiplier
        groups = mamba2_groups(num_heads, n_groups, tp.size)
        self.num_heads, self.n_groups = num_heads // tp.size, groups  # this rank's heads and B / C groups
        self.head_dim, self.state_size = head_dim, state_size
        self.d_inner = self.num_heads * head_dim
        self.conv_dim = self.d_inner + 2 * groups * state_size
        self.conv_kernel, self.chunk_size = conv_kernel, chunk_size
        self.dt_min, self.dt_max = (float(x) for x in time_step_limit)
        full_inner = num_heads * head_dim
        x_part, head_part = even_part(full_inner, tp), even_part(num_heads, tp)
        first = (tp.rank * groups if n_groups % tp.size == 0 else tp.rank // (tp.size // n_groups))
        bc_part = Part(n_groups * state_size, first * state_size, groups * state_size)
        self.in_proj = ColumnParallelLinear(hidden_size, [x_part, x_part, bc_part, bc_part, head_part], proj_bias)
        self.conv1d = nn.Module()  # checkpoint names: conv1d.weight (conv_dim, 1, K), conv1d.bias
        self.conv1d.weight = nn.Parameter(torch.empty(self.conv_dim, 1, conv_kernel))
        self.conv1d.bias = nn.Parameter(torch.zeros(self.conv_dim)) if conv_bias else None
        for p in (q for q in (self.conv1d.weight, self.conv1d.bias) if q is not None):
            set_weight_loader(p, parts_loader([x_part, bc_part, bc_part]))
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            set_weight_loader(p, parts_loader([head_part]))
        parts = [x_part, x_part, bc_part, bc_part, head_part]
        self.register_buffer("proj_scale", None if proj_multipliers is None else torch.cat(
            [torch.full((p.size,), float(m)) for p, m in zip(parts, proj_multipliers)]), persistent=False)
        shared = n_groups % tp.size != 0  # a group spans ranks
        self.norm = None if norm == "none" else GatedRMSNorm(
            x_part, full_inner // n_groups, eps, tp, first if shared else None, n_groups, falcon=norm != "gated",
            norm_before_gate=norm == "falcon_before_gate")
        self.out_proj = RowParallelLinear(full_inner, hidden_size, bias=proj_bias, tp=tp)
    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = meta.num_tokens
        proj = self.in_proj(x[:t] if self.in_multiplier == 1.0 else x[:t] * self.in_multiplier)
        if self.proj_scale is not None:
            proj = proj * self.proj_scale.to(proj.dtype)
        z, xbc, dt = proj.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        y = torch.empty(t, self.num_heads, self.head_dim, dtype=torch.float32, device=x.device)
        for_each_sequence(meta, y, lambda idx, rows: self._step(xbc[idx], dt[idx], state, rows),
                          lambda p: self._chunks(xbc, dt, state, p), state)
        y = y.view(t, self.d_inner)
        out = (y * torch.nn.functional.silu(z.float())).to(x.dtype) if self.norm is None else self.norm(y, z)
        return self.out_proj(pad_rows(out, x.shape[0]))

    def _ssm_inputs(self, xbc: torch.Tensor, dt: torch.Tensor, clamp: bool):
        """Convolved x | B | C (L, conv_dim) -> x (L, H, P), B and C per head (L, H, N), dt (L, H), all float32."""
        n = xbc.shape[0]
        xs, b, c = xbc.float().split([self.d_inner, self.n_groups * self.state_size,
                                      self.n_groups * self.state_size], dim=-1)
        per_group = self.num_heads // self.n_groups
        b = b.view(n, self.n_groups, 1, self.state_size).expand(-1, -1, per_group, -1).reshape(n, self.num_heads, -1)
        c = c.view(n, self.n_groups, 1, self.state_size).expand(-1, -1, per_group, -1).reshape(n, self.num_heads, -1)
        dt = torch.nn.functional.softplus(dt.float() + self.dt_bias.float())
        if clamp:
            dt = dt.clamp(self.dt_min, self.dt_max)
        return xs.view(n, self.num_heads, self.head_dim), b, c, dt

    def _step(self, xbc: torch.Tensor, dt: torch.Tensor, state, rows: torch.Tensor) -> torch.Tensor:
        """One token of each of n sequences (their state rows `rows`) -> y (n, H, P)."""
        conv_state, ssm_state = state
        conv = conv_step(xbc, conv_state, rows, self.conv1d.weight, self.conv1d.bias)
        x, b, c, dt = self._ssm_inputs(torch.nn.functional.silu(conv), dt, clamp=False)
        n, h = dt.shape
        s = load_rows(ssm_state, rows)  # (n, H, P, N): updated in place, one pass per term
        s.mul_(torch.exp(dt * -torch.exp(self.A_log.float()))[..., None, None])
        flat = s.view(n * h, self.head_dim, self.state_size)
        flat.baddbmm_((x * dt[..., None]).reshape(n * h, self.head_dim, 1), b.reshape(n * h, 1, self.state_size))
        store_rows(ssm_state, rows, s)
        y = torch.bmm(flat, c.reshape(n * h, self.state_size, 1)).view(n, h, self.head_dim)
        return y + self.D.float()[:, None] * x

    def _chunks(self, xbc: torch.Tensor, dt: torch.Tensor, state, p: Pieces) -> torch.Tensor:
        """Pieces of several sequences, each from its state -> y (B, L, H, P)."""
        conv_state, ssm_state = state
        nb, length = p.index.shape
        conv = conv_pieces(xbc, conv_state, p, self.conv1d.weight, self.conv1d.bias)
        x, b, c, dt = self._ssm_inputs(torch.nn.functional.silu(conv).reshape(nb * length, -1),
                                       dt[p.index].reshape(nb * length, -1), clamp=True)
        x, b, c = (t.view(nb, length, *t.shape[1:]) for t in (x, b, c))
        dt = dt.view(nb, length, -1) * p.mask[..., None]  # padding leaves the state as it is
        y, final = ssd_scan(x, dt, -torch.exp(self.A_log.float()), b, c, ssm_state[p.rows].float(), self.chunk_size)
        ssm_state[p.rows] = final.to(ssm_state.dtype)
        return y + self.D.float()[:, None] * x


def mamba1_state_shapes(d_inner: int, state_size: int, conv_kernel: int,
                        tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
    """One sequence's state in one Mamba (1) layer on one rank: the last K - 1 convolution inputs and the SSM state,
    per channel."""
    if d_inner % tp_size:
        raise ValueError(f"{d_inner} Mamba channels do not split over tensor_parallel_size={tp_size}")
    d = d_inner // tp_size
    return (d, conv_kernel - 1), (d, state_size)


def selective_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   state: torch.Tensor, chunk_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's recurrence over B sequences' L tokens, in float32: per channel d and state n,
    h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t, y_t = h_t . c_t. x, dt (B, L, D) (dt after softplus; 0 at padding,
    which leaves the state as it is), a (D, N), b / c (B, L, N), state (B, D, N) -> y (B, L, D) without the D
    term, and the states after the last token. Within chunks of chunk_size tokens the decays between every pair
    of positions are formed at once (chunk_size^2 x D x N numbers per sequence)."""
    per_seq = min(chunk_size, x.shape[1]) ** 2 * a.numel()
    if x.shape[0] > 1 and x.shape[0] * per_seq > SCAN_BUDGET:
        return _by_batch(selective_scan, max(1, SCAN_BUDGET // per_seq), x, dt, a, b, c, state, chunk_size)
    y = torch.empty_like(x)
    for s in range(0, x.shape[1], chunk_size):
        dts, xs, bs, cs = (t[:, s:s + chunk_size] for t in (dt, x, b, c))
        n = xs.shape[1]
        cum = torch.cumsum(dts[..., None] * a, dim=1)  # (B, n, D, N)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[:, :, None, None]
        decay = torch.exp((cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf")))  # (B, t, j, D, N)
        u = (dts * xs)[..., None] * bs[:, :, None, :]  # (B, n, D, N)
        h = torch.einsum("ztjdn,zjdn->ztdn", decay, u) + torch.exp(cum) * state[:, None]
        y[:, s:s + n] = torch.einsum("ztdn,ztn->ztd", h, cs)
        state = h[:, -1]
    return y, state


class WeightlessRMSNorm(nn.Module):
    """x / rms(x), in float32, without a weight (FalconMamba's norms of dt, B and C)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MambaMixer(nn.Module):
    """Mamba (1): in_proj -> x | z; x -> causal depthwise conv -> SiLU; x_proj(x) -> dt_low | B | C (Jamba and
    FalconMamba RMS-normalise each); dt = softplus(dt_proj(dt_low)); the selective scan
    with A = -exp(A_log) (channels x state) and the D skip; y x SiLU(z) -> out_proj.

    Tensor parallel: the d_inner channels split over the ranks (in_proj's x and z, conv, A_log, D, dt_proj's rows);
    x_proj is row-parallel (every rank gets the whole dt_low, B, C), out_proj row-parallel."""

    def __init__(self, hidden_size: int, d_inner: int, state_size: int, conv_kernel: int, dt_rank: int, eps: float,
                 proj_bias: bool = False, conv_bias: bool = True, tp: TPGroup = SINGLE, norms: str = "jamba") -> None:
        """norms: "jamba" (RMSNorms with weights on dt_low, B and C), "weightless" (FalconMamba's, no weight) or
        "none" (Mamba's)."""
        super().__init__()
        part = even_part(d_inner, tp)
        self.d_inner, self.state_size, self.dt_rank = part.size, state_size, dt_rank
        self.in_proj = ColumnParallelLinear(hidden_size, [part, part], proj_bias)
        self.conv1d = nn.Module()  # checkpoint names: conv1d.weight (d_inner, 1, K), conv1d.bias
        self.conv1d.weight = nn.Parameter(torch.empty(part.size, 1, conv_kernel))
        self.conv1d.bias = nn.Parameter(torch.zeros(part.size)) if conv_bias else None
        self.A_log = nn.Parameter(torch.zeros(part.size, state_size))
        self.D = nn.Parameter(torch.ones(part.size))
        for p in (q for q in (self.conv1d.weight, self.conv1d.bias, self.A_log, self.D) if q is not None):
            set_weight_loader(p, parts_loader([part]))
        self.x_proj = RowParallelLinear(d_inner, dt_rank + 2 * state_size, bias=False, tp=tp)
        self.dt_proj = ColumnParallelLinear(dt_rank, [part], True)
        if norms == "jamba":
            self.dt_layernorm, self.b_layernorm, self.c_layernorm = (RMSNorm(n, eps) for n in (dt_rank, state_size,
                                                                                               state_size))
        else:
            self.dt_layernorm = self.b_layernorm = self.c_layernorm = (
                WeightlessRMSNorm(eps) if norms == "weightless" else nn.Identity())
        self.out_proj = RowParallelLinear(d_inner, hidden_size, bias=proj_bias, tp=tp)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = meta.num_tokens
        xs, z = self.in_proj.split(self.in_proj(x[:t]))
        y = torch.empty(t, self.d_inner, dtype=torch.float32, device=x.device)
        for_each_sequence(meta, y, lambda idx, rows: self._step(xs[idx], state, rows),
                          lambda p: self._chunks(xs, state, p), state)
        return self.out_proj(pad_rows((y * torch.nn.functional.silu(z.float())).to(x.dtype), x.shape[0]))

    def _ssm_inputs(self, conv: torch.Tensor):
        """Convolved x (n, D) -> x, dt (n, D) after softplus, B and C (n, N); float32."""
        xc = torch.nn.functional.silu(conv)
        dt_low, b, c = self.x_proj(xc).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = torch.nn.functional.linear(self.dt_layernorm(dt_low), self.dt_proj.weight)
        dt = torch.nn.functional.softplus(dt.float() + self.dt_proj.bias.float())
        return xc.float(), dt, self.b_layernorm(b).float(), self.c_layernorm(c).float()

    def _step(self, xs: torch.Tensor, state, rows: torch.Tensor) -> torch.Tensor:
        conv_state, ssm_state = state
        x, dt, b, c = self._ssm_inputs(conv_step(xs, conv_state, rows, self.conv1d.weight, self.conv1d.bias))
        h = load_rows(ssm_state, rows)  # (n, D, N): updated in place
        h.mul_(torch.exp(dt[:, :, None] * -torch.exp(self.A_log.float())))
        h.baddbmm_((dt * x)[:, :, None], b[:, None, :])
        store_rows(ssm_state, rows, h)
        return torch.bmm(h, c[:, :, None])[..., 0] + self.D.float() * x

    def _chunks(self, xs: torch.Tensor, state, p: Pieces) -> torch.Tensor:
        conv_state, ssm_state = state
        nb, length = p.index.shape
        conv = conv_pieces(xs, conv_state, p, self.conv1d.weight, self.conv1d.bias)
        x, dt, b, c = self._ssm_inputs(conv.reshape(nb * length, -1))
        x, b, c = (t.view(nb, length, -1) for t in (x, b, c))
        dt = dt.view(nb, length, -1) * p.mask[..., None]  # padding leaves the state as it is
        y, final = selective_scan(x, dt, -torch.exp(self.A_log.float()), b, c, ssm_state[p.rows].float())
        ssm_state[p.rows] = final.to(ssm_state.dtype)
        return y + self.D.float() * x
