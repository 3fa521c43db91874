"""Engine-level guarantees: preemption and batch composition never change results; blocks never leak."""

import random

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.llm_engine import LLMEngine
from tests.core.helpers import check_block_invariants


def prompts_for(vocab, n, seed=1, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def tokens_of(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def vocab(llama_path):
    import json
    import os

    with open(os.path.join(llama_path, "config.json")) as f:
        return json.load(f)["vocab_size"]


def test_preemption_gives_the_same_greedy_tokens(llama_path, vocab):
    prompts = prompts_for(vocab, 8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ample = LLM(llama_path, block_size=4, num_gpu_blocks_override=512)
    expected = tokens_of(ample.generate(as_inputs(prompts), params, use_tqdm=False))
    tight = LLM(llama_path, block_size=4, num_gpu_blocks_override=20)  # 80 slots for 8 x up to 64 tokens
    got = tokens_of(tight.generate(as_inputs(prompts), params, use_tqdm=False))
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
    sched = tight.llm_engine.scheduler
    assert sched.kv.num_free_blocks == 20 and not sched.kv.tables


def test_preemption_gives_the_same_seeded_samples(llama_path, vocab):
    prompts = prompts_for(vocab, 6, seed=3)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=20, ignore_eos=True)
              for i in range(6)]
    ample = LLM(llama_path, block_size=4, num_gpu_blocks_override=512)
    tight = LLM(llama_path, block_size=4, num_gpu_blocks_override=16)
    expected = tokens_of(ample.generate(as_inputs(prompts), params, use_tqdm=False))
    assert tokens_of(tight.generate(as_inputs(prompts), params, use_tqdm=False)) == expected
    assert tight.llm_engine.scheduler.num_preemptions > 0


SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


@pytest.mark.parametrize("rounds", [{}, {"num_scheduler_steps": 4, "async_scheduling": True},
                                    {"speculative_config": SPEC}], ids=["one-step", "multi-step", "speculative"])
def test_blocks_are_consistent_every_step_and_all_free_after(llama_path, vocab, rounds):
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=24, **rounds)
    engine: LLMEngine = llm.llm_engine
    for i, p in enumerate(prompts_for(vocab, 8, seed=5)):
        temperature = 0.8
        if "speculative_config" in rounds:  # repeats, and greedy loops: drafts to check (and to roll back)
            p, temperature = p[:6] * 3, 0.0 if i % 2 else 0.8
        engine.add_request(str(i), {"prompt_token_ids": p},
                           SamplingParams(temperature=temperature, seed=i, max_tokens=16, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
        check_block_invariants(engine.scheduler.kv)
        tables = engine.scheduler.kv.tables
        ids = [b for t in tables.values() for b in t]
        # Without forks or prefix hits, no block is in two tables.
        assert len(ids) == len({b.block_id for b in ids})
    assert engine.scheduler.kv.num_free_blocks == 24
    assert (engine.stats.device_steps > engine.stats.num_steps) == ("num_scheduler_steps" in rounds)
    stats = engine.get_stats()
    if "speculative_config" in rounds:
        assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens > 0 and stats.num_preemptions > 0


def test_abort_mid_generation_frees_every_block(llama_path, vocab):
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    for i, p in enumerate(prompts_for(vocab, 4, seed=7)):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    outs = engine.abort_request(["0", "1", "2", "3"])
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.scheduler.kv.num_free_blocks == 64 and not engine.has_unfinished_requests()
    # The engine keeps working afterwards.
    out = llm.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("mix_seed", range(4))
def test_output_does_not_depend_on_batch_partners_or_admission_step(llama_path, vocab, mix_seed):
    target = prompts_for(vocab, 1, seed=11, lo=20, hi=20)[0]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=400, max_num_batched_tokens=64)
    alone = tokens_of(llm.generate(as_inputs([target, target]), [greedy, seeded], use_tqdm=False))

    rng = random.Random(mix_seed)
    others = prompts_for(vocab, rng.randint(1, 12), seed=100 + mix_seed, lo=1, hi=90)
    engine = llm.llm_engine
    for i, p in enumerate(others):
        engine.add_request(f"o{i}", {"prompt_token_ids": p},
                           SamplingParams(temperature=rng.choice([0, 0.7]), max_tokens=rng.randint(1, 30)))
    for _ in range(rng.randint(0, 5)):  # the target joins a batch already in flight
        engine.step()
    engine.add_request("g", {"prompt_token_ids": target}, greedy)
    engine.add_request("s", {"prompt_token_ids": target}, seeded)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert [finals["g"], finals["s"]] == alone
