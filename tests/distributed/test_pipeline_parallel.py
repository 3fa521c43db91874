"""Pipeline parallelism (pipeline_parallel_size): the decoder layers split over stages of worker processes. Greedy
outputs and logprobs are checked against transformers on the same checkpoint; what each stage holds (weights, KV
cache layers) is read from the stages themselves through collective_rpc."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.distributed.parallel import pp_layer_range
from pagellm.engine.arg_utils import EngineArgs
from pagellm.worker.kv_cache import bytes_per_block
from tests.hf_reference import hf_greedy, hf_greedy_with, hf_prompt_logprobs

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1, prompt_logprobs=1)


def prompts_for(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 500) for _ in range(n)] for n in (1, 7, 40, 75)]  # 75 > one 32-token chunk


def generate(path: str, prompts, params=GREEDY, **kw):
    kw = {"block_size": 8, "num_gpu_blocks_override": 256, "max_num_batched_tokens": 32, **kw}
    with LLM(path, **kw) as llm:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_equals_transformers(path: str, prompts, outs, reference=None) -> None:
    for p, out in zip(prompts, outs):
        tokens, lps = (reference or (lambda q: hf_greedy(path, q, GREEDY.max_tokens)))(p)
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)
        if reference is None and len(p) > 1:
            mine = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])]
            assert mine == pytest.approx(hf_prompt_logprobs(path, p), abs=2e-4)


def test_layers_split_as_vllm_splits_them():
    """Even shares, the remainder to the stages before the last (which also runs the LM head)."""
    assert [len(pp_layer_range(22, r, 4)) for r in range(4)] == [5, 6, 6, 5]
    assert [len(pp_layer_range(32, r, 4)) for r in range(4)] == [8, 8, 8, 8]
    assert [list(pp_layer_range(3, r, 2)) for r in range(2)] == [[0, 1], [2]]
    assert [list(pp_layer_range(5, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="2 decoder layers do not split over pipeline_parallel_size=3"):
        pp_layer_range(2, 0, 3)


# gpt2 / gpt_bigcode: the tied LM head (wte on the first and the last stage), learned positions on the first only;
# llama_tied_rope: a tied LLaMA head; deepseek_v2: latent attention absorbed per stage, 3 stages of one layer each;
# gemma3: a RoPE table per kind of layer, 4 stages (1 + 2 + 2 + 1 layers); gpt_oss: sinks, experts; gpt_neox: an
# untied head; opt: project_in on the first stage, project_out and the tied head on the last; opt_post_ln: no final
# norm; llama and mixtral: 2 stages of 2 tensor-parallel ranks each (4 processes).
@pytest.mark.parametrize("arch, pp, tp", [("gpt2", 2, 1), ("gpt_bigcode", 2, 1), ("llama_tied_rope", 2, 1),
                                          ("deepseek_v2", 3, 1), ("gemma3", 4, 1), ("gpt_oss", 2, 1),
                                          ("qwen3_moe", 2, 1), ("gpt_neox", 2, 1), ("opt", 2, 1),
                                          ("opt_post_ln", 2, 1), ("llama", 2, 2), ("mixtral", 2, 2)])
def test_pipeline_stages_equal_transformers(tiny_models, arch, pp, tp):
    path = tiny_models[arch]
    prompts = prompts_for()
    outs = generate(path, prompts, pipeline_parallel_size=pp, tensor_parallel_size=tp)
    assert_equals_transformers(path, prompts, outs)


def _held(worker):
    """(parameter names, indices of the cache layers held, KV cache bytes) on this rank."""
    r = worker.model_runner
    return (sorted(n for n, _ in r.model.named_parameters()),
            [i for i, kv in enumerate(r.kv_caches) if kv is not None],
            sum(t.numel() * t.element_size() for t in r.cache_tensors()))


def test_each_stage_holds_only_its_layers_and_their_cache(tiny_models):
    """deepseek_v2 (3 layers, untied head) over 2 stages: stage 0 the embedding and layers 0-1, stage 1 layer 2, the
    final norm and the LM head; each caches only its layers; together they hold every weight exactly once."""
    path = tiny_models["deepseek_v2"]
    with LLM(path, num_gpu_blocks_override=64, block_size=8) as llm:
        (whole, layers, _), = llm.collective_rpc(_held)
    with LLM(path, pipeline_parallel_size=2, num_gpu_blocks_override=64, block_size=8) as llm:
        (names0, layers0, bytes0), (names1, layers1, bytes1) = llm.collective_rpc(_held)
        per_layer = bytes_per_block(llm.llm_engine.config) // 3
        prompts = prompts_for(1)[:2]
        assert_equals_transformers(path, prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                               use_tqdm=False))
    assert layers == [0, 1, 2] and layers0 == [0, 1] and layers1 == [2]
    assert (bytes0, bytes1) == (2 * 64 * per_layer, 64 * per_layer)
    assert sorted(names0 + names1) == whole
    assert "model.embed_tokens.weight" in names0 and {"model.norm.weight", "lm_head.weight"} <= set(names1)
    assert all(n.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens.")) for n in names0)
    assert all(n.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for n in names1)


def test_the_kv_pool_is_what_the_fullest_stage_fits(tiny_models):
    """Under one memory budget per process, a stage fits more blocks than a process holding every layer; the
    engine's pool is the fewest any stage fits. gemma3's 6 layers over 4 stages: 1 + 2 + 2 + 1, so the middle
    stages (not rank 0, which holds one layer) bound the pool at budget / (2 layers' block bytes)."""
    path = tiny_models["gemma3"]
    budget = 1 << 20
    with LLM(path, kv_cache_memory=budget, block_size=8) as llm:
        blocks_1 = llm.llm_engine.get_stats().num_total_blocks
        per_layer = bytes_per_block(llm.llm_engine.config) // 6
    with LLM(path, pipeline_parallel_size=4, kv_cache_memory=budget, block_size=8) as llm:
        blocks_4 = llm.llm_engine.get_stats().num_total_blocks
        layers = [held for _, held, _ in llm.collective_rpc(_held)]
        prompts = prompts_for(2)[:2]
        assert_equals_transformers(path, prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                               use_tqdm=False))
    assert layers == [[0], [1, 2], [3, 4], [5]]
    assert blocks_1 == budget // (6 * per_layer) and blocks_4 == budget // (2 * per_layer)


def test_preemption_and_seeded_sampling_across_stages(tiny_models):
    """A pool too small for every sequence: preempted sequences are recomputed through both stages and still give
    transformers' greedy tokens; seeded random sampling (n=2) draws the same tokens as one process."""
    path = tiny_models["llama"]
    prompts = [list(range(5, 45)), list(range(60, 100)), list(range(200, 230)), list(range(300, 335))]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    kw = {"num_gpu_blocks_override": 14, "block_size": 8, "max_num_batched_tokens": 64}
    with LLM(path, pipeline_parallel_size=2, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        assert llm.llm_engine.get_stats().num_preemptions > 0
        seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, n=2, seed=7, ignore_eos=True)
        sampled_pp = [[c.token_ids for c in o.outputs] for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts[:2]], seeded, use_tqdm=False)]
        stats = llm.llm_engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, p, greedy.max_tokens)[0]
    sampled_1 = [[c.token_ids for c in o.outputs] for o in generate(path, prompts[:2], seeded, **kw)]
    assert sampled_pp == sampled_1


def _mixed_params():
    """Greedy, seeded sampling (n=2, best_of), penalties, logprobs and stop tokens: what a step's tokens feed."""
    return [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.8, top_k=20, seed=3, n=2, max_tokens=18, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, presence_penalty=0.4,
                           ignore_eos=True),
            SamplingParams(temperature=1.0, seed=11, best_of=3, n=1, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0, min_tokens=4, max_tokens=22, stop_token_ids=[7, 9, 11]),
            SamplingParams(temperature=0.7, seed=5, frequency_penalty=0.5, max_tokens=25, ignore_eos=True)] * 2


def _watch_micro_batches(llm) -> dict:
    """Wrap the executor: record how many steps were in flight at once, and any sequence launched while a step that
    samples its next token was still out (never allowed: the first stage needs that token)."""
    ex = llm.llm_engine.executor
    launch = ex.execute_model_async
    seen = {"max_in_flight": 0, "clashes": 0, "in_flight": []}

    def watched(sched):
        out_now = {s for pending in seen["in_flight"] for s in pending}
        seen["clashes"] += len(out_now & set(sched.num_scheduled_tokens))
        handle = launch(sched)
        sampling = set(sched.sampling_seq_ids)
        seen["in_flight"].append(sampling)
        seen["max_in_flight"] = max(seen["max_in_flight"], len(seen["in_flight"]))

        class Watched:
            def result(self):
                seen["in_flight"].remove(sampling)
                return handle.result()
        return Watched()
    ex.execute_model_async = watched
    return seen


def test_stages_work_on_micro_batches_of_other_sequences(tiny_models):
    """Two stages keep two steps in flight, each of sequences the other does not hold, so both stages work at once;
    the outputs (greedy, seeded sampling with n and best_of, penalties, stop tokens, logprobs) equal one process's,
    every block comes back, and two stages of two tensor-parallel ranks do the same."""
    path = tiny_models["llama"]
    rng = random.Random(4)
    prompts = [[rng.randrange(4, 500) for _ in range(rng.randint(3, 50))] for _ in range(12)]
    params = _mixed_params()

    def run(**kw):
        with LLM(path, num_gpu_blocks_override=128, block_size=8, max_num_batched_tokens=64, **kw) as llm:
            seen = _watch_micro_batches(llm) if kw else None
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            stats, counters = llm.llm_engine.get_stats(), llm.llm_engine.stats
            assert stats.num_free_blocks == stats.num_total_blocks
            # every send (commands, hidden states, results) was taken and let go: nothing piles up on any rank
            assert all(llm.collective_rpc(lambda w: w.model_runner.tp.outbox.drain(5.0)))
            got = [[(c.token_ids, c.finish_reason, c.cumulative_logprob) for c in o.outputs] for o in outs]
            return got, seen, counters

    one, _, _ = run()
    for kw in ({"pipeline_parallel_size": 2}, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}):
        got, seen, counters = run(**kw)
        assert seen["max_in_flight"] == 2 and seen["clashes"] == 0
        assert counters.overlapped_steps > counters.num_steps // 2
        for mine, ref in zip(got, one):
            assert [(t, f) for t, f, _ in mine] == [(t, f) for t, f, _ in ref]
            assert [lp for _, _, lp in mine] == pytest.approx([lp for _, _, lp in ref], abs=1e-4)


def test_abort_while_micro_batches_are_in_flight(tiny_models):
    """A request aborted while the last stage still works on its step, and one between its steps: their blocks come
    back, the late result is dropped, and the other requests still give transformers' greedy tokens."""
    from pagellm.engine.llm_engine import LLMEngine

    path = tiny_models["llama"]
    prompts = prompts_for(5) + prompts_for(6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = LLMEngine.from_engine_args(EngineArgs(model=path, pipeline_parallel_size=2, block_size=8,
                                                   num_gpu_blocks_override=128, max_num_batched_tokens=64))
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
        for _ in range(6):  # a step call returns with the younger micro-batch still in flight
            engine.step()
        (sched, _), = engine.core._in_flight
        flying = {engine.scheduler._seqs[i].request.request_id for i in sched.num_scheduled_tokens}
        resting = {r.request_id for r in engine.scheduler.running} - flying
        assert flying and resting
        victims = [min(flying), min(resting)]
        done = {o.request_id: o for o in engine.abort_request(victims)}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        stats = engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()
    for i, p in enumerate(prompts):
        out = done[str(i)].outputs[0]
        if str(i) in victims:
            assert out.finish_reason == "abort"
        else:
            assert out.token_ids == hf_greedy(path, p, params.max_tokens)[0]


def test_structured_output_and_logits_processors_on_the_last_stage(tiny_models):
    """The grammar bitmask rides in every rank's SchedulerOutput; the last stage, which samples, applies it and a
    custom logits processor: the outputs equal one process's."""
    import re

    from pagellm.sampling_params import StructuredOutputsParams

    spec = StructuredOutputsParams(regex="[a-z]{2,6}( [a-z]{2,6}){1,3}")
    prompts = ["The quick", "Paged attention"]
    outs = {}
    for pp in (1, 2):
        with LLM(tiny_models["llama"], pipeline_parallel_size=pp, num_gpu_blocks_override=64,
                 logits_processors=["tests.engine.lp_ext:NoRepeat"]) as llm:
            constrained = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec),
                                       use_tqdm=False)
            distinct = llm.generate({"prompt_token_ids": [5, 6, 7]},
                                    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   extra_args={"no_repeat": True}), use_tqdm=False)
            outs[pp] = ([o.outputs[0].text for o in constrained], distinct[0].outputs[0].token_ids)
    assert outs[1] == outs[2]
    assert all(re.fullmatch("[a-z]{2,6}( [a-z]{2,6}){1,3}", t) for t in outs[2][0])
    assert len(set(outs[2][1])) == 24


def test_weight_updates_reach_every_stage(tiny_models):
    """update_weights with the whole state dict: each stage takes its layers' tensors (and skips the others'); the
    outputs then equal transformers on the new weights. Sleep frees every stage's weights and cache."""
    from tests.engine.test_sleep_and_weights import perturbed

    path = tiny_models["llama"]
    hf, state = perturbed(path, seed=5)
    with LLM(path, pipeline_parallel_size=2, num_gpu_blocks_override=64, block_size=8, enable_sleep_mode=True) as llm:
        llm.update_weights(state)
        prompts = prompts_for(2)[:3]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert_equals_transformers(path, prompts, outs, lambda p: hf_greedy_with(hf, p, GREEDY.max_tokens))
        llm.sleep(1)
        assert llm.collective_rpc(lambda w: sum(t.untyped_storage().nbytes()
                                                for t in w.model_runner.cache_tensors())) == [0, 0]
        llm.wake_up()
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
        with pytest.raises(ValueError, match="no parameter"):  # a name no stage holds is still an error
            llm.update_weights({"model.layers.0.self_attn.nope.weight": torch.zeros(2)})


def test_what_pipeline_stages_refuse(tiny_models):
    with pytest.raises(ValueError, match="does not run in pipeline stages"):
        EngineArgs(model=tiny_models["granitemoehybrid"], pipeline_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="does not run in pipeline stages"):
        EngineArgs(model=tiny_models["stablelm"], pipeline_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="2 decoder layers, fewer than pipeline_parallel_size=3"):
        EngineArgs(model=tiny_models["llama"], pipeline_parallel_size=3).create_engine_config()
    with pytest.raises(ValueError, match="speculative_config needs pipeline_parallel_size=1"):
        EngineArgs(model=tiny_models["llama"], pipeline_parallel_size=2,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2}).create_engine_config()
    with pytest.raises(ValueError, match="num_scheduler_steps > 1 needs pipeline_parallel_size=1"):
        EngineArgs(model=tiny_models["llama"], pipeline_parallel_size=2, num_scheduler_steps=4).create_engine_config()
    with pytest.raises(ValueError, match="async_scheduling needs"):
        EngineArgs(model=tiny_models["llama"], pipeline_parallel_size=2, async_scheduling=True).create_engine_config()
    with pytest.raises(ValueError, match="pipeline_parallel_size must be a positive integer"):
        EngineArgs(model=tiny_models["llama"], pipeline_parallel_size=0).create_engine_config()


def test_vllm_flags_and_their_short_forms():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["m", "-pp", "2", "-tp", "2", "-dp", "3"])
    args = EngineArgs.from_cli_args(ns)
    assert (args.pipeline_parallel_size, args.tensor_parallel_size, args.data_parallel_size) == (2, 2, 3)
    ns = parser.parse_args(["m", "--pipeline-parallel-size", "4"])
    assert EngineArgs.from_cli_args(ns).pipeline_parallel_size == 4


def test_ray_places_the_stages(tiny_models):
    """The same stages with ranks placed as Ray actors (a local Ray instance the test starts and stops)."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install pagellm[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path, prompts = tiny_models["llama"], prompts_for(3)
        assert_equals_transformers(path, prompts, generate(path, prompts, pipeline_parallel_size=2,
                                                           distributed_executor_backend="ray"))
    finally:
        ray.shutdown()
