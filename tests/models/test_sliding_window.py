"""Sliding-window attention as paged memory: blocks behind every layer's window are handed back,
so a long generation holds a bounded number of blocks, and output still equals Hugging Face's."""

import random

from pagellm import LLM, SamplingParams
from tests.core.helpers import check_block_invariants
from tests.hf_reference import hf_greedy

WINDOW = 20  # tests/fixtures/make_models.py: the mistral fixture's sliding_window


def test_long_generation_holds_blocks_bounded_by_the_window_and_matches_hf(tiny_models):
    path = tiny_models["mistral"]
    # 16 blocks of 4 = 64 slots; one 230-token sequence would need 58 blocks without the window.
    llm = LLM(path, block_size=4, num_gpu_blocks_override=16, max_num_batched_tokens=16)
    engine = llm.llm_engine
    assert engine.config.model.sliding_window == WINDOW
    vocab = engine.config.model.vocab_size
    rng = random.Random(5)
    prompts = [[rng.randrange(4, vocab) for _ in range(n)] for n in (30, 7)]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    kv = engine.scheduler.kv
    bound = kv.max_blocks_per_seq(230, 16)  # (20 - 1 + 16) // 4 + 2 = 10
    most, outs = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        check_block_invariants(kv)
        for seq_id in kv.tables:
            live = kv.num_live_blocks(seq_id)
            assert live <= bound
            most = max(most, live)
    assert most <= 10 and kv.num_free_blocks == 16
    for i, p in enumerate(prompts):
        assert outs[str(i)].outputs[0].token_ids == hf_greedy(path, p, 200)[0]


def test_alternating_global_layers_keep_every_block(tiny_models):
    """Gemma 2 alternates sliding and global layers: the global ones read every token, so no block is freed."""
    llm = LLM(tiny_models["gemma2"], block_size=4, num_gpu_blocks_override=64)
    assert llm.llm_engine.config.model.sliding_window is None
    out = llm.generate([{"prompt_token_ids": list(range(10, 50))}],
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(tiny_models["gemma2"], list(range(10, 50)), 40)[0]


def test_preemption_under_a_window_gives_the_same_tokens(tiny_models):
    path = tiny_models["mistral"]
    rng = random.Random(9)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 500) for _ in range(rng.randint(5, 40))]} for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ample = LLM(path, block_size=4, num_gpu_blocks_override=512)
    tight = LLM(path, block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=32)
    expected = [o.outputs[0].token_ids for o in ample.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
