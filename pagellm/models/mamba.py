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
    """The recurrence over one sequence's L tokens, in float32, chunk by chunk.

    x (L, H, P), dt (L, H) (after softplus), a (H,) (negative), b / c (L, H, N) (per head), state (H, P, N): the
    state before the first token -> y (L, H, P) without the D term, and the state after the last token.
    """
    y = torch.empty_like(x)
    for s in range(0, x.shape[0], chunk_size):
        xs, dts, bs, cs = x[s:s + chunk_size], dt[s:s + chunk_size], b[s:s + chunk_size], c[s:s + chunk_size]
        n = xs.shape[0]
        cum = torch.cumsum(dts * a, dim=0)  # (n, H): log of the decay from the chunk's start to each token
        seg = cum[:, None, :] - cum[None, :, :]  # (t, u, H): log decay from token u to token t
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(seg.masked_fill(~causal[..., None], float("-inf")))
        xdt = xs * dts[..., None]  # (n, H, P)
        scores = torch.einsum("thn,uhn->tuh", cs, bs) * decay
        y[s:s + n] = (torch.einsum("tuh,uhp->thp", scores, xdt)
                      + torch.einsum("thn,hpn->thp", cs, state) * torch.exp(cum)[..., None])
        last = cum[-1]  # (H,)
        state = (state * torch.exp(last)[:, None, None]
                 + torch.einsum("uh,uhn,uhp->hpn", torch.exp(last[None] - cum), bs, xdt))
    return y, state


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The causal depthwise convolution at one new input of each of n sequences: x (n, C), conv_state (rows, C,
    K - 1) holding each sequence's last K - 1 inputs (updated), weight (C, 1, K) -> (n, C), before the activation."""
    window = torch.cat((conv_state[rows], x[:, :, None].to(conv_state.dtype)), dim=-1)  # (n, C, K)
    conv_state[rows] = window[..., 1:]
    out = (window * weight[:, 0]).sum(-1)
    return out if bias is None else out + bias


def conv_chunk(x: torch.Tensor, conv_state: torch.Tensor, row: int, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """The same over L new inputs of one sequence: x (L, C) -> (L, C); its state row keeps the last K - 1 inputs."""
    k = weight.shape[-1]
    inputs = torch.cat((conv_state[row], x.t().to(conv_state.dtype)), dim=-1)  # (C, K - 1 + L)
    conv_state[row] = inputs[:, -(k - 1):]
    out = torch.nn.functional.conv1d(inputs[None].to(weight.dtype), weight, groups=weight.shape[0])[0].t()
    return out if bias is None else out + bias


def for_each_sequence(meta: AttentionMetadata, out: torch.Tensor, step, chunk,
                      state: tuple[torch.Tensor, ...] = ()) -> None:
    """out[rows of the step's tokens] from a recurrent layer, per sequence: `step(token index (n,), state rows (n,))`
    for every sequence with one token this step (decode, or a one-token chunk), all at once; `chunk(start, end,
    state row)` for each sequence with more. Under prefix caching a sequence's state is checkpointed at the points
    meta.state_saves names (a chunk is computed in pieces between them; each piece's end state is copied into its
    slot's row of `state`, this layer's state tensors). The split is worked out once per step (meta.recurrent_plan):
    its index tensors go to the device once, not once per layer."""
    if meta.recurrent_plan is None:
        meta.recurrent_plan = _recurrent_plan(meta, out.device)
    idx, state_rows, chunks, single_saves = meta.recurrent_plan
    if idx is not None:
        out[idx] = step(idx, state_rows)
        if single_saves is not None:
            src, dst = single_saves
            for t in state:
                t[dst] = t[src]
    for s, e, row, save in chunks:
        out[s:e] = chunk(s, e, row)
        if save is not None:
            for t in state:
                t[save].copy_(t[row])


def _recurrent_plan(meta: AttentionMetadata, device: torch.device):
    """(token index of the one-token sequences, their state rows, [(start, end, state row, checkpoint row or
    None)] pieces of the longer chunks, (state rows, checkpoint rows) of one-token sequences checkpointed after
    their token)."""
    qsl, rows, saves = meta.query_start_loc_cpu, meta.state_rows_cpu, meta.state_saves or {}
    single = [i for i in range(len(rows)) if qsl[i + 1] - qsl[i] == 1]
    idx = torch.tensor([qsl[i] for i in single], device=device) if single else None
    state_rows = meta.state_rows if len(single) == len(rows) else meta.state_rows[single]
    single_saves = [(rows[i], saves[i][0][1]) for i in single if i in saves]
    chunks = []
    for i in range(len(rows)):
        start, end = qsl[i], qsl[i + 1]
        if end - start == 1:
            continue
        for offset, slot_row in saves.get(i, ()):
            chunks.append((start, qsl[i] + offset, rows[i], slot_row))
            start = qsl[i] + offset
        if start < end:
            chunks.append((start, end, rows[i], None))
    single_saves = (torch.tensor([r for r, _ in single_saves], device=device),
                    torch.tensor([d for _, d in single_saves], device=device)) if single_saves else None
    return idx, state_rows, chunks, single_saves


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
                          lambda s, e, row: self._chunk(xbc[s:e], dt[s:e], state, row), state)
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
        a = -torch.exp(self.A_log.float())
        s = (ssm_state[rows].float() * torch.exp(dt * a)[..., None, None]
             + (x * dt[..., None])[..., None] * b[:, :, None, :])  # (n, H, P, N)
        ssm_state[rows] = s.to(ssm_state.dtype)
        return torch.einsum("nhpk,nhk->nhp", s, c) + self.D.float()[:, None] * x

    def _chunk(self, xbc: torch.Tensor, dt: torch.Tensor, state, row: int) -> torch.Tensor:
        """L > 1 tokens of one sequence, from its state in row `row` -> y (L, H, P)."""
        conv_state, ssm_state = state
        conv = conv_chunk(xbc, conv_state, row, self.conv1d.weight, self.conv1d.bias)
        x, b, c, dt = self._ssm_inputs(torch.nn.functional.silu(conv), dt, clamp=True)
        a = -torch.exp(self.A_log.float())
        y, final = ssd_scan(x, dt, a, b, c, ssm_state[row].float(), self.chunk_size)
        ssm_state[row] = final.to(ssm_state.dtype)
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
    """Mamba's recurrence over one sequence's L tokens, in float32: per channel d and state n,
    h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t, y_t = h_t . c_t. x, dt (L, D) (dt after softplus), a (D, N), b / c (L, N),
    state (D, N) -> y (L, D) without the D term, and the state after the last token. Within chunks of chunk_size
    tokens the decays between every pair of positions are formed at once (chunk_size^2 x D x N numbers)."""
    y = torch.empty_like(x)
    for s in range(0, x.shape[0], chunk_size):
        dts, xs, bs, cs = dt[s:s + chunk_size], x[s:s + chunk_size], b[s:s + chunk_size], c[s:s + chunk_size]
        n = xs.shape[0]
        cum = torch.cumsum(dts[:, :, None] * a[None], dim=0)  # (n, D, N)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[:, :, None, None]
        decay = torch.exp((cum[:, None] - cum[None, :]).masked_fill(~causal, float("-inf")))  # (t, j, D, N)
        u = (dts * xs)[:, :, None] * bs[:, None, :]  # (n, D, N)
        h = torch.einsum("tjdn,jdn->tdn", decay, u) + torch.exp(cum) * state[None]
        y[s:s + n] = torch.einsum("tdn,tn->td", h, cs)
        state = h[-1]
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
                          lambda s, e, row: self._chunk(xs[s:e], state, row), state)
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
        a = -torch.exp(self.A_log.float())
        h = ssm_state[rows].float() * torch.exp(dt[:, :, None] * a) + (dt * x)[:, :, None] * b[:, None, :]
        ssm_state[rows] = h.to(ssm_state.dtype)
        return torch.einsum("ndk,nk->nd", h, c) + self.D.float() * x

    def _chunk(self, xs: torch.Tensor, state, row: int) -> torch.Tensor:
        conv_state, ssm_state = state
        x, dt, b, c = self._ssm_inputs(conv_chunk(xs, conv_state, row, self.conv1d.weight, self.conv1d.bias))
        y, final = selective_scan(x, dt, -torch.exp(self.A_log.float()), b, c, ssm_state[row].float())
        ssm_state[row] = final.to(ssm_state.dtype)
        return y + self.D.float() * x

