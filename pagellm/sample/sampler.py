"""Logits -> sampled tokens and logprobs, for the whole batch at once.

No Python loop over the vocabulary and none over rows, except the rows that
ask for top-k logprobs when results are turned into lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.sample.metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32: logprob of the sampled token (raw or processed per row)
    ranks: torch.Tensor | None  # (B,) int64: 1-based rank of the sampled token, rows asking for logprobs
    top_ids: torch.Tensor | None  # (B, max_num_logprobs) int64
    top_logprobs: torch.Tensor | None  # (B, max_num_logprobs) float32


class Sampler:
    """Samples one token per row. The steps, in order:

    1. keep the raw logits' log-softmax for rows reporting raw logprobs
    2. logit bias, allowed token ids, banned tokens (bad words; EOS and stop ids below min_tokens), then the
       grammar bitmask of structured-output rows, then custom logits processors (sample/logits_processor.py)
    3. penalties: repetition (over prompt and output tokens), frequency and presence (output tokens)
    4. greedy rows: argmax of the logits so far (ties go to the lowest id)
    5. temperature
    6. min_p, then top_k, then top_p (each over what the previous left)
    7. random rows: inverse-CDF sampling with one counter-based uniform per row, so a seeded
       row's token depends only on its own logits, its seed and its position
    8. logprob of the sampled token, its rank and the top-k, from the raw or processed distribution
    """

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        raw = logits.float()
        has_processors = (md.logit_bias is not None or md.allowed_mask is not None or md.banned is not None
                          or md.grammar is not None or md.custom is not None)
        logits = apply_processors(raw.clone(), md) if has_processors else raw
        logits = apply_penalties(logits, md)
        log_total = None  # logsumexp of `final` rows, when sampling already computed it
        if md.all_greedy:
            tokens = logits.argmax(dim=-1)
            final = logits
        else:
            scaled = logits if md.all_temperature_one else logits / md.temperature[:, None]
            final = apply_filters(scaled, md)
            tokens, log_total = sample_inverse_cdf(final, md.uniforms)
            if not md.all_random:
                tokens = torch.where(md.greedy, logits.argmax(dim=-1), tokens)
        # A plain random batch samples from the raw logits themselves: reuse their logsumexp (one pass fewer).
        return gather_logprobs(raw, final, tokens, md, log_total if final is raw else None)


def apply_processors(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    if md.logit_bias is not None:
        rows, ids, bias = md.logit_bias
        logits.index_put_((rows, ids), bias, accumulate=True)
    if md.allowed_mask is not None:
        logits.masked_fill_(~md.allowed_mask, float("-inf"))
    if md.banned is not None:
        rows, ids = md.banned
        logits[rows, ids] = float("-inf")
    if md.grammar is not None:
        bitmask, rows = md.grammar
        logits[rows] = logits[rows].masked_fill(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))
    if md.custom is not None:
        logits = md.custom(logits)
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(G, W) int32 words -> (G, vocab_size) bool: bit t % 32 of word t // 32 says whether token t is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 31 of a negative word reads 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """vLLM / HF semantics: repetition divides positive and multiplies negative logits of seen tokens."""
    if md.repetition_penalties is not None:
        seen = md.prompt_mask | (md.output_counts > 0)
        rep = md.repetition_penalties[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalties is not None:
        logits = logits - md.frequency_penalties[:, None] * md.output_counts
    if md.presence_penalties is not None:
        logits = logits - md.presence_penalties[:, None] * (md.output_counts > 0).float()
    return logits


def apply_filters(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """min_p, top_k, top_p, with Hugging Face's tie and minimum-keep rules."""
    neg_inf = float("-inf")
    if md.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * md.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, neg_inf)
    if not md.needs_sort:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if md.top_k is not None:
        # Tokens below the k-th largest value go; ties with it stay (as HF's TopKLogitsWarper).
        kth = sorted_logits.gather(1, (vocab - md.top_k.clamp(1, vocab))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
    if md.top_p is not None:
        # Drop the low tail whose mass is <= 1 - top_p: the smallest set with mass >= top_p stays.
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - md.top_p)[:, None]
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, neg_inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


_CDF_BLOCK = 256


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token i with probability p_i: the first index whose cumulative weight exceeds u * total.
    Returns (tokens (B,), the rows' logsumexp (B,)).

    Two levels, so the vocabulary is read twice, not cumulated: weights w = exp(x - max) summed in
    blocks of 256, the block found on the (short) cumulative block sums, then the token inside that
    block. Zero-weight tokens are never chosen (their step of the CDF is empty; rounding at the very
    end falls back to the last token with weight). Every operation is per row.
    """
    b, v = logits.shape
    top = logits.amax(dim=-1, keepdim=True)
    w = (logits - top).exp_()  # (B, V), 0 for -inf
    pad = (-v) % _CDF_BLOCK
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    wb = w.view(b, -1, _CDF_BLOCK)  # (B, nblk, 256)
    bcdf = wb.sum(dim=-1).cumsum(dim=-1)  # (B, nblk)
    x = uniforms.to(w.dtype)[:, None] * bcdf[:, -1:]  # (B, 1)
    blk = torch.minimum(torch.searchsorted(bcdf, x, right=True), _first_at_max(bcdf))
    before = torch.where(blk > 0, bcdf.gather(1, (blk - 1).clamp_(min=0)), torch.zeros_like(x))
    inner = wb.gather(1, blk[:, :, None].expand(b, 1, _CDF_BLOCK)).squeeze(1).cumsum(dim=-1)  # (B, 256)
    pos = torch.minimum(torch.searchsorted(inner, x - before, right=True), _first_at_max(inner))
    return (blk * _CDF_BLOCK + pos).squeeze(1), (top + bcdf[:, -1:].log()).squeeze(1)


def _first_at_max(cdf: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of the first entry equal to the row's last (largest) value: the last positive step."""
    return (cdf < cdf[:, -1:]).sum(dim=-1, keepdim=True)


def gather_logprobs(raw: torch.Tensor, final: torch.Tensor, tokens: torch.Tensor,
                    md: SamplingMetadata, raw_log_total: torch.Tensor | None = None) -> SamplerOutput:
    idx = tokens[:, None]
    log_total = raw_log_total if raw_log_total is not None else raw.logsumexp(dim=-1)
    raw_lp = raw.gather(1, idx).squeeze(1) - log_total
    lp_of_token = raw_lp
    full = None
    if md.processed_logprobs is not None:  # set only when some row asked for processed logprobs
        processed = final.log_softmax(dim=-1)
        lp_of_token = torch.where(md.processed_logprobs, processed.gather(1, idx).squeeze(1), raw_lp)
        full = torch.where(md.processed_logprobs[:, None], processed, raw.log_softmax(dim=-1))
    if md.max_num_logprobs is None:
        return SamplerOutput(tokens, lp_of_token, None, None, None)
    if full is None:
        full = raw.log_softmax(dim=-1)
    lp_of_token = full.gather(1, idx).squeeze(1)  # same rounding as the top-k values below
    ranks = (full > lp_of_token[:, None]).sum(dim=-1) + 1
    top_lp, top_ids = full.topk(md.max_num_logprobs, dim=-1) if md.max_num_logprobs > 0 else (None, None)
    return SamplerOutput(tokens, lp_of_token, ranks, top_ids, top_lp)


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """For logits at positions p and the prompt tokens at p + 1: (logprob, rank, top-k ids, top-k logprobs)."""
    lp = logits.float().log_softmax(dim=-1)
    tok_lp = lp.gather(1, targets[:, None]).squeeze(1)
    ranks = (lp > tok_lp[:, None]).sum(dim=-1) + 1
    if k > 0:
        top_lp, top_ids = lp.topk(k, dim=-1)
    else:
        top_lp = torch.empty(len(targets), 0)
        top_ids = torch.empty(len(targets), 0, dtype=torch.long)
    return tok_lp, ranks, top_ids, top_lp
