"""The recurrent layers' chunked forms, batched over sequences of different lengths (padded at the end, padding
made to leave the state alone), against the token-by-token recurrence each one computes."""

from __future__ import annotations

import pytest
import torch

from pagellm.models import gated_deltanet, mamba
from pagellm.models.gated_deltanet import delta_rule_chunked
from pagellm.models.mamba import Pieces, conv_pieces, conv_step, selective_scan, ssd_scan

LENGTHS = (5, 17, 9, 1)


def padded(lengths, *shape, gen):
    """(B, max L, *shape) random, and the (B, max L) mask of real positions."""
    longest = max(lengths)
    mask = torch.tensor([[j < n for j in range(longest)] for n in lengths])
    return torch.randn(len(lengths), longest, *shape, generator=gen), mask


def test_ssd_scan_over_padded_sequences_is_the_recurrence():
    gen = torch.Generator().manual_seed(0)
    h, p, n = 3, 4, 5
    x, mask = padded(LENGTHS, h, p, gen=gen)
    b, _ = padded(LENGTHS, h, n, gen=gen)
    c, _ = padded(LENGTHS, h, n, gen=gen)
    dt = torch.nn.functional.softplus(padded(LENGTHS, h, gen=gen)[0]) * mask[..., None]
    a = -torch.rand(h, generator=gen) - 0.1
    state = torch.randn(len(LENGTHS), h, p, n, generator=gen)
    y, final = ssd_scan(x, dt, a, b, c, state, chunk_size=4)
    for i, length in enumerate(LENGTHS):
        s = state[i]
        for t in range(length):  # S_t = exp(dt a) S + dt x B^T, y_t = S C
            s = s * torch.exp(dt[i, t] * a)[:, None, None] + (x[i, t] * dt[i, t][:, None])[..., None] * b[i, t][:, None]
            torch.testing.assert_close(y[i, t], torch.einsum("hpn,hn->hp", s, c[i, t]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], s, atol=1e-5, rtol=1e-5)


def test_selective_scan_over_padded_sequences_is_the_recurrence():
    gen = torch.Generator().manual_seed(1)
    d, n = 6, 4
    x, mask = padded(LENGTHS, d, gen=gen)
    b, _ = padded(LENGTHS, n, gen=gen)
    c, _ = padded(LENGTHS, n, gen=gen)
    dt = torch.nn.functional.softplus(padded(LENGTHS, d, gen=gen)[0]) * mask[..., None]
    a = -torch.rand(d, n, generator=gen) - 0.1
    state = torch.randn(len(LENGTHS), d, n, generator=gen)
    y, final = selective_scan(x, dt, a, b, c, state, chunk_size=4)
    for i, length in enumerate(LENGTHS):
        s = state[i]
        for t in range(length):
            s = torch.exp(dt[i, t][:, None] * a) * s + (dt[i, t] * x[i, t])[:, None] * b[i, t][None]
            torch.testing.assert_close(y[i, t], s @ c[i, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_delta_rule_over_padded_sequences_folded_into_heads_is_the_recurrence(per_channel, monkeypatch):
    """A log decay per head (Gated DeltaNet: g (H, L)) or per key channel (Kimi Delta Attention: g (H, L, Kd), in
    chunks of 4 with blocks of 2 whose decays are taken pair by pair)."""
    monkeypatch.setattr(gated_deltanet, "SUB_CHUNK", 2)
    gen = torch.Generator().manual_seed(2)
    heads, dk, dv = 2, 4, 3
    nb, longest = len(LENGTHS), max(LENGTHS)
    mask = torch.tensor([[j < n for j in range(longest)] for n in LENGTHS])
    q = torch.nn.functional.normalize(torch.randn(nb * heads, longest, dk, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(nb * heads, longest, dk, generator=gen), dim=-1)
    v = torch.randn(nb * heads, longest, dv, generator=gen)
    keep = mask.repeat_interleave(heads, dim=0)
    g = -torch.rand(nb * heads, longest, *((dk,) if per_channel else ()), generator=gen) * (
        keep[..., None] if per_channel else keep)
    beta = torch.rand(nb * heads, longest, generator=gen) * keep
    state = torch.randn(nb * heads, dk, dv, generator=gen)
    o, final = delta_rule_chunked(q, k, v, g, beta, state, chunk_size=4)
    for j in range(nb * heads):
        s = state[j]
        for t in range(LENGTHS[j // heads]):  # S = e^g S + beta k (v - S^T k)^T, o = S^T q
            s = s * (torch.exp(g[j, t])[:, None] if per_channel else torch.exp(g[j, t]))  # rows: key channels
            s = s + beta[j, t] * torch.outer(k[j, t], v[j, t] - s.t() @ k[j, t])
            torch.testing.assert_close(o[j, t], s.t() @ q[j, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[j], s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sub", [1, 3, 16])
def test_channel_decayed_products_do_not_overflow_where_the_decay_is_strong(sub):
    """Log decays down to -40 per token (a block's total far below float32's exp range): the products equal the
    pair-by-pair sum, with nothing infinite or NaN."""
    gen = torch.Generator().manual_seed(4)
    h, n, kd = 2, 11, 5
    x, k = torch.randn(h, n, kd, generator=gen), torch.randn(h, n, kd, generator=gen)
    cum = torch.cumsum(-40 * torch.rand(h, n, kd, generator=gen), dim=1)
    (got,) = gated_deltanet.channel_decayed_products((x,), k, cum, sub)
    diff = (cum[:, :, None] - cum[:, None]).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril()[..., None],
                                                       float("-inf"))
    want = (x[:, :, None] * k[:, None] * torch.exp(diff)).sum(-1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_scans_split_a_large_batch_into_smaller_ones(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 2, 3, generator=gen)
    dt = torch.rand(5, 7, 2, generator=gen)
    b, c = torch.randn(5, 7, 2, 4, generator=gen), torch.randn(5, 7, 2, 4, generator=gen)
    state = torch.randn(5, 2, 3, 4, generator=gen)
    whole = ssd_scan(x, dt, -torch.ones(2), b, c, state, chunk_size=4)
    monkeypatch.setattr(mamba, "SCAN_BUDGET", 1)  # one sequence at a time
    split = ssd_scan(x, dt, -torch.ones(2), b, c, state, chunk_size=4)
    for w, s in zip(whole, split):
        torch.testing.assert_close(w, s)
    xs, dts = torch.randn(5, 7, 3, generator=gen), torch.rand(5, 7, 3, generator=gen)
    bs, cs = torch.randn(5, 7, 4, generator=gen), torch.randn(5, 7, 4, generator=gen)
    a, st = -torch.rand(3, 4, generator=gen), torch.randn(5, 3, 4, generator=gen)
    split = selective_scan(xs, dts, a, bs, cs, st)
    monkeypatch.setattr(mamba, "SCAN_BUDGET", 1 << 24)
    for w, s in zip(selective_scan(xs, dts, a, bs, cs, st), split):
        torch.testing.assert_close(w, s)


@pytest.mark.parametrize("kernel", [2, 4])
def test_conv_over_pieces_is_the_one_token_convolution(kernel):
    """Pieces of 5, 1 and 3 tokens from rows 2, 0, 1 (in that order in the step) against conv_step token by
    token; the state rows end with each piece's last K - 1 inputs."""
    gen = torch.Generator().manual_seed(4)
    channels = 3
    x = torch.randn(9, channels, generator=gen)
    weight, bias = torch.randn(channels, 1, kernel, generator=gen), torch.randn(channels, generator=gen)
    state = torch.randn(3, channels, kernel - 1, generator=gen)
    pieces = Pieces.build([(0, 5, 2), (5, 6, 0), (6, 9, 1)], torch.device("cpu"))
    got_state = state.clone()
    out = conv_pieces(x, got_state, pieces, weight, bias)[pieces.mask]
    want_state = state.clone()
    want = [conv_step(x[t:t + 1], want_state, torch.tensor([row]), weight, bias)[0]
            for t, row in zip(range(9), (2, 2, 2, 2, 2, 0, 1, 1, 1))]
    torch.testing.assert_close(out, torch.stack(want))
    torch.testing.assert_close(got_state, want_state)
