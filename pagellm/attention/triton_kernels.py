"""Triton kernels of the triton_paged backend (see triton_paged.py for the design).

Imported only when that backend is chosen: this module imports Triton at load time.
"""

import triton
import triton.language as tl


@triton.jit
def _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    # The last sequence s with qsl[s] // BLOCK_Q + s <= pid.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1

@triton.jit
def paged_attention(out_ptr, part_out_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, qsl_ptr,
                    sinks_ptr, num_seqs, scale, window, chunk, soft_cap, v_scale,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_tab,
                    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, SOFT_CAP: tl.constexpr, SLIDING: tl.constexpr, CHUNKED: tl.constexpr,
                    SINKS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    s = _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    qb = pid - (q_start // BLOCK_Q + s)
    if qb * BLOCK_Q >= q_len:
        return
    n = tl.load(lens_ptr + s)  # context length after this step; queries sit at n - q_len ..
    m_idx = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + m_idx // G  # token within the sequence's queries
    head = kvh * G + m_idx % G
    row_ok = (m_idx < BLOCK_Q * G) & (tok < q_len)
    q_pos = n - q_len + tok
    d = tl.arange(0, DP)
    d_ok = d < D
    q_off = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    # Keys this query block sees: lo .. hi - 1 (lo > 0 only under a sliding window or chunked attention).
    last_tok = tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len) - 1
    hi = n - q_len + last_tok + 1
    first_q = n - q_len + qb * BLOCK_Q
    lo = 0
    if SLIDING:
        lo = tl.maximum(first_q - window + 1, 0)
    if CHUNKED:
        lo = tl.maximum(lo, first_q // chunk * chunk)
    first_tile = lo // TILE_N
    num_tiles = tl.cdiv(hi, TILE_N) - first_tile
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    t_begin = first_tile + split * per_split
    t_end = tl.minimum(t_begin + per_split, first_tile + num_tiles)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    n_idx = tl.arange(0, TILE_N)
    for t in range(t_begin, t_end):
        pos = t * TILE_N + n_idx
        k_ok = (pos >= lo) & (pos < hi)
        blk = tl.load(tables_ptr + s * stride_tab + pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        kv_off = blk[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(DOT_DTYPE)  # (TILE_N, DP)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * scale  # (BLOCK_M, TILE_N) float32
        if SOFT_CAP:
            # cap * tanh(qk / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            qk = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * qk / soft_cap) + 1.0))
        visible = k_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        if CHUNKED:
            visible = visible & (pos[None, :] >= (q_pos // chunk * chunk)[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(DOT_DTYPE), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    row = q_start + tok  # batch row of each tile row's token
    if NUM_SPLITS == 1:
        if SINKS:  # each head's sink joins the softmax's sum (GPT-OSS), with no value
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0)
            m_fin = tl.maximum(m_i, sink)
            alpha = tl.exp(m_i - m_fin)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha + tl.exp(sink - m_fin)
        res = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * v_scale
        o_off = row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # partials: out (T, H, NUM_SPLITS, DP), max and sum (T, H, NUM_SPLITS, 2); H = num_kv_heads * G
        num_h = tl.num_programs(1) * G
        base = (row * num_h + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + base[:, None] * DP + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + base * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_ok)

@triton.jit
def merge_splits(out_ptr, part_out_ptr, part_ml_ptr, sinks_ptr, num_tokens, v_scale, stride_qt, stride_qh,
                 H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 SP: tl.constexpr, SINKS: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if t >= num_tokens:
        return
    sp = tl.arange(0, SP)
    sp_ok = sp < NUM_SPLITS
    d = tl.arange(0, DP)
    base = (t * H + h) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + base * 2, mask=sp_ok, other=float("-inf"))
    ll = tl.load(part_ml_ptr + base * 2 + 1, mask=sp_ok, other=0.0)
    m_all = tl.max(m, axis=0)
    if SINKS:
        sink = tl.load(sinks_ptr + h)
        m_all = tl.maximum(m_all, sink)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(sp_ok & (m > float("-inf")), tl.exp(m - m_all), 0.0)  # splits that saw no key weigh 0
    denom = tl.sum(ll * w, axis=0)
    if SINKS:  # the head's sink, once, in the sum
        denom = denom + tl.exp(sink - m_all)
    acc = tl.load(part_out_ptr + base[:, None] * DP + d[None, :], mask=sp_ok[:, None], other=0.0)
    res = tl.sum(acc * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom) * v_scale
    tl.store(out_ptr + t * stride_qt + h * stride_qh + d, res.to(out_ptr.dtype.element_ty), mask=d < D)
