"""Sampler properties on hand-made logits, and parity with Hugging Face's logits processors."""

import numpy as np
import pytest
import torch

from pagellm.core.sched_output import NewSeqData
from pagellm.sample.sampler import Sampler, apply_filters, apply_penalties, sample_inverse_cdf
from pagellm.sampling_params import SamplingParams
from pagellm.worker.input_batch import InputBatch, counter_uniforms

V = 64


def batch_with(params_list, prompts=None, outputs=None, eos=(0,)):
    b = InputBatch(max_num_seqs=16, max_model_len=128, block_size=4, vocab_size=V,
                   eos_token_ids=frozenset(eos), device=torch.device("cpu"))
    for i, p in enumerate(params_list):
        prompt = (prompts or {}).get(i, [1, 2, 3])
        out = (outputs or {}).get(i, [])
        b.add(NewSeqData(i, f"r{i}", prompt + out, len(prompt), [0], 0, p, seed=p.seed if p.seed is not None else i))
    rows = np.array([b.row_of[i] for i in range(len(params_list))])
    return b, rows


def sample(logits, params_list, **kw):
    b, rows = batch_with(params_list, **kw)
    md = b.sampling_metadata(rows)
    return Sampler()(logits.clone(), md), md


def test_greedy_is_argmax():
    logits = torch.randn(5, V)
    out, _ = sample(logits, [SamplingParams(temperature=0)] * 5)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)] * 2
    out, _ = sample(logits, params)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


def filtered(logits, params_list):
    b, rows = batch_with(params_list)
    md = b.sampling_metadata(rows)
    return apply_filters(logits.clone() / md.temperature[:, None], md)


@pytest.mark.parametrize("k", [1, 2, 7, 63])
def test_top_k_keeps_exactly_k(k):
    logits = torch.randn(3, V)
    f = filtered(logits, [SamplingParams(top_k=k)] * 3)
    assert (torch.isfinite(f).sum(-1) == k).all()
    kept = torch.isfinite(f)
    for row in range(3):
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == set(logits[row].topk(k).indices.tolist())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p):
    logits = torch.randn(4, V) * 2
    f = filtered(logits, [SamplingParams(top_p=p)] * 4)
    probs = logits.softmax(-1)
    for row in range(4):
        kept = torch.isfinite(f[row])
        mass = probs[row][kept].sum().item()
        assert mass >= p - 1e-6
        # Dropping the least likely kept token would fall below p: the set is minimal.
        least = probs[row][kept].min().item()
        assert mass - least < p + 1e-6 or kept.sum() == 1


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    logits = torch.randn(2, V)
    f = filtered(logits, [SamplingParams(min_p=0.2)] * 2)
    probs = logits.softmax(-1)
    keep = probs >= 0.2 * probs.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(f), keep)


def test_top_k_top_p_equal_hf_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(6, V) * 3
    ours = filtered(logits, [SamplingParams(temperature=0.7, top_k=20, top_p=0.8)] * 6)
    ids = torch.zeros(6, 1, dtype=torch.long)
    ref = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(20)(ids, TemperatureLogitsWarper(0.7)(ids, logits.clone())))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_repetition_penalty_equals_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, V) * 3
    prompt, output = [5, 6, 7], [7, 9, 9, 11]
    b, rows = batch_with([SamplingParams(repetition_penalty=1.7)], prompts={0: prompt}, outputs={0: output})
    ours = apply_penalties(logits.clone(), b.sampling_metadata(rows))
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    assert torch.allclose(ours, ref)


def test_frequency_and_presence_penalties_match_a_reference():
    logits = torch.randn(1, V)
    output = [9, 9, 9, 4]
    b, rows = batch_with([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)], outputs={0: output})
    ours = apply_penalties(logits.clone(), b.sampling_metadata(rows))
    ref = logits.clone()
    for tok, count in {9: 3, 4: 1}.items():
        ref[0, tok] -= 0.5 * count + 0.25
    assert torch.allclose(ours, ref)


def test_logit_bias_allowed_ids_and_min_tokens():
    logits = torch.zeros(3, V)
    params = [SamplingParams(temperature=0, logit_bias={17: 5.0}),
              SamplingParams(temperature=0, allowed_token_ids=[30, 31]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])]
    logits[1, 31] = 1.0
    logits[2, 0] = 10.0  # EOS would win
    logits[2, 5] = 9.0  # then the stop id
    out, _ = sample(logits, params)
    assert out.token_ids.tolist() == [17, 31, 1]  # row 2: everything else is 0 -> lowest id after banned ones


def test_allowed_ids_never_sample_anything_else():
    logits = torch.randn(1, V)
    toks = set()
    for seed in range(30):
        out, _ = sample(logits, [SamplingParams(temperature=1.0, allowed_token_ids=[3, 8, 40], seed=seed)])
        toks.add(out.token_ids.item())
    assert toks <= {3, 8, 40} and len(toks) > 1


def test_bad_words_ban_the_last_token_after_its_prefix():
    logits = torch.zeros(2, V)
    logits[:, 12] = 5.0
    p = SamplingParams(temperature=0)
    p._bad_words_token_ids = [[11, 12], [20]]
    logits[:, 20] = 6.0
    # row 0 just generated 11: 12 is banned; row 1 did not: 12 stays.  20 is always banned.
    out, _ = sample(logits, [p, p], outputs={0: [11], 1: [13]})
    assert out.token_ids.tolist()[1] == 12
    assert out.token_ids.tolist()[0] not in (12, 20)


def test_seed_reproduces_and_does_not_depend_on_batch_partners():
    torch.manual_seed(1)
    logits = torch.randn(8, V)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone, _ = sample(logits[:1], [seeded])
    others = [SamplingParams(temperature=0.5, seed=i) for i in range(7)]
    mixed, _ = sample(torch.cat([logits[5:], logits[:1], logits[1:5]]), others[:3] + [seeded] + others[3:])
    assert mixed.token_ids[3] == alone.token_ids[0]
    again, _ = sample(logits[:1], [seeded])
    assert again.token_ids[0] == alone.token_ids[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (V - 3))
    logits = probs.log()[None].repeat(2000, 1)
    b = InputBatch(2000, 8, 4, V, frozenset(), torch.device("cpu"))
    for i in range(2000):
        b.add(NewSeqData(i, "r", [1], 1, [0], 0, SamplingParams(temperature=1.0, seed=i), seed=i))
    rows = np.array([b.row_of[i] for i in range(2000)])
    toks = Sampler()(logits, b.sampling_metadata(rows)).token_ids
    freq = torch.bincount(toks, minlength=V).float() / 2000
    assert freq[3:].sum() == 0
    assert torch.allclose(freq[:3], probs[:3], atol=0.04)


_MASK64 = (1 << 64) - 1


def counter_uniform(seed: int, counter: int) -> float:
    """SplitMix64 over (seed, counter) in Python integers: the definition the vectorised version must match."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def test_counter_uniforms_are_a_pure_function_in_range():
    seeds, counters = np.repeat(np.arange(50, dtype=np.uint64), 50), np.tile(np.arange(50), 50)
    xs = counter_uniforms(seeds, counters)
    assert ((0 <= xs) & (xs < 1)).all() and 0.45 < xs.mean() < 0.55
    again = counter_uniforms(np.array([7, 7], dtype=np.uint64), np.array([3, 4]))
    assert again[0] == xs[7 * 50 + 3] and again[1] != again[0]


def test_vectorised_counter_uniforms_equal_the_scalar_function():
    rng = np.random.default_rng(0)
    seeds = [0, 1, 7, 2**63 + 5, 2**64 - 1, -3, 12345678901234567890] + rng.integers(0, 2**62, 50).tolist()
    counters = rng.integers(0, 5000, len(seeds))
    got = counter_uniforms(np.array([s & (2**64 - 1) for s in seeds], dtype=np.uint64), counters)
    assert got.tolist() == [counter_uniform(s, int(c)) for s, c in zip(seeds, counters)]


def test_logprobs_rank_and_top_k():
    logits = torch.tensor([[3.0, 1.0, 2.0] + [-10.0] * (V - 3)])
    out, _ = sample(logits, [SamplingParams(temperature=0, logprobs=2)])
    lp = logits.log_softmax(-1)
    assert out.token_ids.item() == 0 and out.ranks.item() == 1
    assert out.top_ids[0].tolist() == [0, 2]
    assert torch.allclose(out.top_logprobs[0], lp[0, [0, 2]])
    assert out.logprobs.item() == pytest.approx(lp[0, 0].item())


def test_processed_logprobs_reflect_temperature_and_filters():
    logits = torch.tensor([[3.0, 1.0, 2.0] + [-10.0] * (V - 3)])
    p = SamplingParams(temperature=0.5, top_k=2, logprobs=1, logprobs_mode="processed_logprobs", seed=0)
    out, _ = sample(logits, [p])
    kept = torch.tensor([3.0, 2.0]) / 0.5
    expected = kept.log_softmax(-1)
    tok = out.token_ids.item()
    assert tok in (0, 2)
    assert out.logprobs.item() == pytest.approx(expected[0 if tok == 0 else 1].item(), abs=1e-5)


def test_inverse_cdf_edges_never_pick_zero_weight_tokens():

    logits = torch.full((4, 1000), float("-inf"))
    logits[:, [3, 500, 700]] = torch.tensor([0.0, 1.0, 2.0])
    u = torch.tensor([0.0, 1 - 1e-12, 0.5, 0.999999], dtype=torch.float64)
    toks = sample_inverse_cdf(logits, u)[0].tolist()
    assert toks[0] == 3 and toks[1] == 700 and all(t in (3, 500, 700) for t in toks)
    # u splits the mass: weights e^0, e^1, e^2 -> cumulative 1, 3.72, 11.1 of 11.1
    probs = torch.tensor([1.0, 2.718281828, 7.389056099])
    edges = (probs.cumsum(0) / probs.sum()).tolist()
    u2 = torch.tensor([edges[0] - 1e-6, edges[0] + 1e-6, edges[1] + 1e-6, 0.0], dtype=torch.float64)
    assert sample_inverse_cdf(logits, u2)[0].tolist() == [3, 500, 700, 3]


def test_inverse_cdf_reports_the_rows_logsumexp():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(4)) * 3
    logits[1, 500:] = float("-inf")
    _, log_total = sample_inverse_cdf(logits, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert torch.allclose(log_total, logits.logsumexp(dim=-1), atol=1e-5)
