"""Tensor parallelism over worker processes: TP=2 gives TP=1's greedy tokens, and a dead worker is a clear,
bounded engine error.

Logprob tolerance: a row-parallel layer sums two float32 partial products instead of one, so each
all-reduce rounds differently (relative error ~1e-7 per layer); over these 2-4 layer models the
log-softmax moves by ~1e-6, except where Gated DeltaNet's triangular solves amplify the rounding
(Qwen3-Next: up to 1.2e-4 between the two, each within 1e-4 of transformers). 2e-4, the tolerance
against transformers, still catches any sharding mistake, which moves logprobs by whole units.
"""

import os
import random
import re
import signal
import time

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.llm_engine import EngineDeadError

TOL = 2e-4


def run(path: str, tp: int, prompts: list[list[int]], backend: str | None = None, **kw):
    with LLM(path, tensor_parallel_size=tp, distributed_executor_backend=backend, block_size=8,
             num_gpu_blocks_override=256, max_num_batched_tokens=32, **kw) as llm:
        greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                                             prompt_logprobs=1), use_tqdm=False)
        return greedy


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in (1, 7, 40, 75)]  # 75 > one 32-token chunk


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert set(lx) == set(ly)
            assert all(abs(lx[t].logprob - ly[t].logprob) < TOL for t in lx)
        for px, py in zip((x.prompt_logprobs or [None])[1:], (y.prompt_logprobs or [None])[1:]):
            assert all(abs(px[t].logprob - py[t].logprob) < TOL for t in px)


# gpt2: Conv1D weights; gpt_bigcode: one K/V head replicated on both ranks; llama: GQA with 2 K/V heads
# (>= tp and < 2 * tp); llama_tied_rope: one K/V head and a tied LM head; the others: every family's layers
# (granitemoehybrid: Mamba groups split over the ranks; bamba: one group shared, its norm all-reduced; qwen3_next:
# grouped projections; qwen3_5: split projections; the recurrent states per rank; gemma4: caches of two shapes,
# one K/V head replicated, K/V shared between layers, per-layer inputs; gemma4_moe: experts beside the MLP;
# minimax_m2: q/k norms over all heads all-reduced, sigmoid-routed experts; kimi_linear: KDA's low-rank gates split
# with the heads, latent attention; bailing_hybrid: full-rank gates, latent attention gated per head; deepseek_v32 and
# glm_moe_dsa: sparse attention, the indexer replicated).
@pytest.mark.parametrize("arch", ["gpt2", "gpt_bigcode", "llama", "llama_tied_rope", "qwen3", "phi3", "gemma2",
                                  "gpt_neox", "opt", "mixtral", "qwen2_moe", "gemma", "gemma3", "qwen3_moe", "granite",
                                  "starcoder2", "olmo2", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
                                  "glm4_moe_lite", "llama4", "granitemoehybrid", "bamba", "qwen3_next", "qwen3_5",
                                  "qwen3_5_moe", "nemotron_h", "lfm2", "falcon_h1",
                                  "falcon_h1_nonorm", "jamba", "mamba", "mamba2", "gemma4", "gemma4_moe",
                                  "lfm2_moe", "olmo_hybrid", "olmo_hybrid_nope", "minimax",
                                  "minimax_m2", "kimi_linear", "bailing_hybrid", "deepseek_v32", "glm_moe_dsa"])
def test_tp2_greedy_equals_tp1(tiny_models, arch):
    path = tiny_models[arch]
    prompts = prompts_for(500)
    assert_same(run(path, 2, prompts), run(path, 1, prompts))


@pytest.mark.parametrize("arch", ["granitemoehybrid", "qwen3_next"])
def test_tp2_resumes_cached_prefixes_from_each_ranks_state_checkpoints(tiny_models, arch):
    """Prefix caching on a hybrid model: each rank checkpoints and restores its own share of the recurrent state."""
    base = prompts_for(500)[2]
    later = [base[:30] + [7, 8, 9], base[:21], base]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = {}
    for tp in (2, 1):
        with LLM(tiny_models[arch], tensor_parallel_size=tp, block_size=4, num_gpu_blocks_override=256,
                 max_num_batched_tokens=32, mamba_block_size=8) as llm:
            llm.generate({"prompt_token_ids": base}, params, use_tqdm=False)
            outs[tp] = llm.generate([{"prompt_token_ids": p} for p in later], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs[2]] == [24, 16, 32]
    assert_same(outs[2], outs[1])


# mixtral: per-expert w1/w2/w3 tensors; qwen3_moe: a dense layer among sparse ones; deepseek_v3: grouped routing,
# shared experts (tensor-parallel) beside the routed ones; gpt_oss: experts stacked in one tensor, biases; llama4:
# router weights applied to the experts' input
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4", "minimax_m2"])
def test_expert_parallel_greedy_equals_tp1(tiny_models, arch):
    path = tiny_models[arch]
    prompts = prompts_for(500)
    assert_same(run(path, 2, prompts, enable_expert_parallel=True), run(path, 1, prompts))


def test_expert_parallel_ranks_hold_whole_experts(tiny_models):
    with LLM(tiny_models["qwen3_moe"], tensor_parallel_size=2, enable_expert_parallel=True,
             num_gpu_blocks_override=64) as llm:
        experts = llm.llm_engine.executor.driver.runner.model.model.layers[0].mlp.experts
        assert (experts.num_local_experts, experts.e_start) == (2, 0)  # 4 experts: rank 0 holds 0 and 1
        assert tuple(experts.w13.shape) == (2, 2 * 32, 64) and tuple(experts.w2.shape) == (2, 64, 32)  # all of I


def test_each_rank_holds_its_shard(llama_path):
    with LLM(llama_path, tensor_parallel_size=2, num_gpu_blocks_override=64) as llm:
        model = llm.llm_engine.executor.driver.runner.model
        cfg = llm.llm_engine.config
        # 4 query heads and 2 K/V heads of 16: rank 0 keeps 2 + 1 + 1 heads of q/k/v, half the MLP, half the vocab
        assert tuple(model.model.layers[0].self_attn.qkv_proj.weight.shape) == ((2 + 1 + 1) * 16, 64)
        assert tuple(model.model.layers[0].mlp.down_proj.weight.shape) == (64, 64)
        assert model.model.embed_tokens.weight.shape[0] == -(-cfg.model.vocab_size // 2)
        assert cfg.model.num_kv_heads == 1  # per rank: the KV cache is sized for this rank's heads


def test_transformers_fallback_refuses_tensor_parallel(tiny_models):
    with pytest.raises(ValueError, match="transformers fallback, which cannot be sharded"):
        LLM(tiny_models["stablelm"], tensor_parallel_size=2)


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_a_killed_worker_is_a_clear_error_within_a_bounded_time(llama_path, parallel):
    """Rank 1 killed (a tensor-parallel shard, or the last pipeline stage, which samples): the requests in flight
    fail with the rank named and their blocks freed, new work is refused, and nothing hangs."""
    llm = LLM(llama_path, **parallel, num_gpu_blocks_override=64, distributed_timeout=20)
    engine = llm.llm_engine
    worker = engine.executor.procs[0]
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    start = time.monotonic()
    outs = []
    while engine.has_unfinished_requests() and time.monotonic() - start < 30:
        outs += engine.step()
    assert time.monotonic() - start < 25  # not a hang
    assert engine.dead is not None and "rank 1" in engine.dead, engine.dead
    failed = [o for o in outs if o.request_id == "a"][-1]
    assert failed.finished and failed.error.startswith("engine dead:")
    assert engine.scheduler.kv.num_free_blocks == 64
    with pytest.raises(EngineDeadError, match="the engine is dead"):
        llm.generate("x", SamplingParams(max_tokens=1))
    llm.shutdown()


def test_ray_backend_equals_tp1(llama_path):
    """The same sharded model with ranks placed as Ray actors, on a local Ray instance the test starts and stops."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install pagellm[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prompts = prompts_for(500, seed=3)
        assert_same(run(llama_path, 2, prompts, backend="ray"), run(llama_path, 1, prompts))
        # the workers' placement group is released: both CPUs are free again
        deadline = time.time() + 10
        while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 2
    finally:
        ray.shutdown()


def test_data_parallel_replicas_take_their_own_gpus():
    """On CUDA each replica's core process sees only its own world-size slice of the visible GPUs (its ranks then
    take them in order); with too few GPUs the replicas share them all."""
    from pagellm.engine.async_engine import replica_gpus

    visible = ["0", "1", "2", "3", "4", "5", "6", "7"]
    assert [replica_gpus(i, 4, visible) for i in range(2)] == ["0,1,2,3", "4,5,6,7"]
    assert [replica_gpus(i, 2, ["3", "5", "6", "7"]) for i in range(2)] == ["3,5", "6,7"]
    assert replica_gpus(2, 4, visible) is None and replica_gpus(0, 1, []) is None


def test_data_parallel_is_a_server_option(llama_path):
    with pytest.raises(ValueError, match="data_parallel_size is for `pagellm serve`"):
        LLM(llama_path, data_parallel_size=2)


def test_a_hung_worker_is_an_error_after_the_distributed_timeout(llama_path):
    llm = LLM(llama_path, tensor_parallel_size=2, num_gpu_blocks_override=64, distributed_timeout=3)
    engine = llm.llm_engine
    worker = engine.executor.procs[0]
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    os.kill(worker.pid, signal.SIGSTOP)  # alive but answering nothing
    try:
        start = time.monotonic()
        outs = []
        while engine.has_unfinished_requests() and time.monotonic() - start < 30:
            outs += engine.step()
        assert 2.5 < time.monotonic() - start < 15
        assert "did not answer within the distributed timeout (3 s" in engine.dead
        assert outs[-1].error.startswith("engine dead:")
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        llm.shutdown()


def test_structured_output_under_tensor_parallelism(tiny_models):
    """The grammar bitmask rides in the SchedulerOutput to rank 0, which samples: TP=2 keeps TP=1's outputs."""
    from pagellm.sampling_params import StructuredOutputsParams

    spec = StructuredOutputsParams(regex="[a-z]{2,6}( [a-z]{2,6}){1,3}")
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec)
    prompts = ["The quick", "Paged attention"]
    outs = {}
    for tp in (1, 2):
        with LLM(tiny_models["llama"], tensor_parallel_size=tp, num_gpu_blocks_override=64) as llm:
            outs[tp] = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[1] == outs[2]
    assert all(re.fullmatch("[a-z]{2,6}( [a-z]{2,6}){1,3}", t) for t in outs[2])


def test_speculative_decoding_under_tensor_parallelism(llama_path):
    """Every rank computes the drafts' positions; rank 0 samples them and decides what is kept: TP=2 keeps TP=1's
    tokens, and the drafts are really checked and accepted (prompts that repeat themselves)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    prompts = [list(range(20, 32)) * 3, [5, 6, 7, 8] * 5, [11] * 10]
    outs = {}
    for tp in (1, 2):
        with LLM(llama_path, tensor_parallel_size=tp, num_gpu_blocks_override=64, speculative_config=spec) as llm:
            greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                  SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2),
                                  use_tqdm=False)
            outs[tp] = greedy
            assert llm.llm_engine.get_stats().spec_num_accepted_tokens > 0
    for x, y in zip(outs[1], outs[2]):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert all(abs(lx[t].logprob - ly[t].logprob) < TOL for t in lx)


def test_speculative_decoding_rewinds_each_ranks_recurrent_state(tiny_models):
    """A hybrid model under speculative decoding: every rank saves its share of the state after each draft and puts
    back the one the verdict names (the verdicts reach the ranks with the next step), and checkpoints within kept
    drafts are copied on every rank; TP=2 gives HF's greedy tokens, as TP=1 does."""
    from tests.hf_reference import hf_greedy
    from tests.models.test_hybrid import NGRAM, foresee
    from tests.models.test_hybrid import prompts as hybrid_prompts

    path = tiny_models["granitemoehybrid"]
    ps = hybrid_prompts(500, lengths=(5, 13, 30))
    want = [hf_greedy(path, p, 20)[0] for p in ps]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for tp in (2, 1):
        with LLM(path, tensor_parallel_size=tp, block_size=4, num_gpu_blocks_override=256, mamba_block_size=4,
                 speculative_config=NGRAM) as llm:
            foresee(llm, [p + t for p, t in zip(ps, want)])
            outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == want
            turn = ps[1] + want[1] + [5, 6, 7]  # 13 + 19 computed: a checkpoint at 32, maybe copied from a draft's
            again = llm.generate({"prompt_token_ids": turn}, params, use_tqdm=False)[0]
            assert again.num_cached_tokens == 32
            assert again.outputs[0].token_ids == hf_greedy(path, turn, 20)[0]
            stats = llm.llm_engine.get_stats()
            assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
