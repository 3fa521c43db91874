"""LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): two sets of rotary factors. transformers turns a sequence with the
short ones while it fits original_max_position_embeddings and with the long ones once it is longer; pagellm, as
vLLM, picks one set for every sequence from max_model_len. Checked against transformers where the two agree:
max_model_len within the original length (short factors), and prompts longer than it (long factors)."""

import json
import os
import random
import shutil

import pytest

from pagellm import LLM, SamplingParams
from tests.hf_reference import hf_greedy

ORIGINAL = 48


@pytest.fixture(scope="module")
def phi3_longrope(tiny_models, tmp_path_factory) -> str:
    """The tiny Phi-3 (partial rotary: 8 of 16 dimensions turned, so 4 factors per set) with LongRoPE."""
    src = tiny_models["phi3"]
    out = str(tmp_path_factory.mktemp("phi3_longrope"))
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), out)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["original_max_position_embeddings"] = ORIGINAL
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                              "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 3.0, 6.0, 12.0],
                              "original_max_position_embeddings": ORIGINAL}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(4, 512) for _ in range(n)] for n in lengths]


def run(path, ps, max_tokens, **kw):
    llm = LLM(path, block_size=8, num_gpu_blocks_override=128, **kw)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def assert_hf(path, ps, got, max_tokens):
    for p, (tokens, lps) in zip(ps, got):
        ref_tokens, ref_lps = hf_greedy(path, p, max_tokens)
        assert tokens == ref_tokens, f"prompt of {len(p)} tokens diverged"
        assert lps == pytest.approx(ref_lps, abs=2e-4)


def test_within_the_original_length_the_short_factors_match_hf(phi3_longrope):
    ps = prompts([1, 5, 17, 30])
    got = run(phi3_longrope, ps, ORIGINAL - 30, max_model_len=ORIGINAL)
    assert_hf(phi3_longrope, ps, got, ORIGINAL - 30)


def test_prompts_longer_than_the_original_length_match_hf_in_chunks_too(phi3_longrope):
    ps = prompts([ORIGINAL + 1, 70, 120], seed=1)
    for kw in ({}, {"max_num_batched_tokens": 24, "max_num_seqs": 2}):
        got = run(phi3_longrope, ps, 24, max_model_len=256, **kw)
        assert_hf(phi3_longrope, ps, got, 24)


def test_max_model_len_picks_the_factors(phi3_longrope):
    """The same short prompt under both sets: different logprobs (the long factors are in use past the original
    length), and the long set is what transformers uses for that prompt once it is long."""
    ps = prompts([20])
    short, long = run(phi3_longrope, ps, 8, max_model_len=ORIGINAL), run(phi3_longrope, ps, 8, max_model_len=256)
    assert short[0][1] != pytest.approx(long[0][1], abs=1e-3)
