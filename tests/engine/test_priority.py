"""scheduling_policy="priority" (vLLM's): lower priority values first, preempting lower priorities for room."""

import pytest

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import RequestOutputKind

GREEDY = dict(temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)


def _finish_order(engine) -> list[str]:
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def _add(engine, rid: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
    inp = engine.process_input({"prompt_token_ids": prompt_ids}, params)
    inp.priority = priority
    engine.add_request(rid, inp)


def test_waiting_requests_are_served_by_priority_then_arrival(llama_path):
    for policy, expected in (("fcfs", ["a", "b", "c", "d"]), ("priority", ["b", "d", "a", "c"])):
        engine = LLM(llama_path, max_num_seqs=1, scheduling_policy=policy, num_gpu_blocks_override=64).llm_engine
        for rid, prio in (("a", 5), ("b", 0), ("c", 5), ("d", 0)):
            _add(engine, rid, [3, 4, 5], SamplingParams(max_tokens=3, **GREEDY), prio if policy == "priority" else 0)
        assert _finish_order(engine) == expected


def test_generate_takes_priorities(llama_path):
    llm = LLM(llama_path, max_num_seqs=1, scheduling_policy="priority", num_gpu_blocks_override=64)
    prompts = [{"prompt_token_ids": [7, 8, 9 + i]} for i in range(3)]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    alone = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]  # input order kept
    times = [o.metrics["first_scheduled_time"] for o in outs]
    assert times[1] < times[2] < times[0]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(prompts, params, use_tqdm=False, priority=[0])


@pytest.mark.parametrize("overlap", [{}, {"async_scheduling": True, "num_scheduler_steps": 4}],
                         ids=["plain", "async_multistep"])
@pytest.mark.parametrize("limit", ["seqs", "blocks"])
def test_a_higher_priority_request_preempts_a_running_lower_one(llama_path, limit, overlap):
    # seqs: one sequence at a time, so the waiting high-priority request preempts to be admitted; blocks: both
    # run until the pool runs dry (room for one request's 130 tokens, not two), then the lower one is preempted
    kw = dict(max_num_seqs=1) if limit == "seqs" else dict(num_gpu_blocks_override=12, block_size=16)
    llm = LLM(llama_path, scheduling_policy="priority", **({"num_gpu_blocks_override": 64} | kw | overlap))
    engine = llm.llm_engine
    low = SamplingParams(max_tokens=100, **GREEDY)
    engine.add_request("low", {"prompt_token_ids": list(range(10, 40))}, low)
    for _ in range(5):
        engine.step()
    _add(engine, "high", list(range(50, 80)), SamplingParams(max_tokens=100, **GREEDY), priority=-1)
    outs = {}
    order = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
                order.append(o.request_id)
    assert order == ["high", "low"] and engine.scheduler.num_preemptions >= 1
    ref = LLM(llama_path, num_gpu_blocks_override=64).generate(
        [{"prompt_token_ids": list(range(10, 40))}, {"prompt_token_ids": list(range(50, 80))}],
        SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert outs["low"].outputs[0].token_ids == ref[0].outputs[0].token_ids  # recomputed, same tokens
    assert outs["high"].outputs[0].token_ids == ref[1].outputs[0].token_ids
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_total_blocks


def test_equal_priority_never_preempts(llama_path):
    engine = LLM(llama_path, max_num_seqs=1, scheduling_policy="priority", num_gpu_blocks_override=64).llm_engine
    _add(engine, "first", [1, 2, 3], SamplingParams(max_tokens=20, **GREEDY), priority=3)
    engine.step()
    _add(engine, "second", [4, 5, 6], SamplingParams(max_tokens=2, **GREEDY), priority=3)
    assert _finish_order(engine) == ["first", "second"] and engine.scheduler.num_preemptions == 0


def test_priority_needs_the_priority_policy(llama_path):
    llm = LLM(llama_path, num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False, priority=[3])
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        _add(llm.llm_engine, "x", [1, 2], SamplingParams(max_tokens=2), priority=1)
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(llama_path, scheduling_policy="lifo")


def test_server_priority_field():
    import openai

    from tests.entrypoints.server_utils import RemoteServer

    s = RemoteServer(["--num-gpu-blocks-override", "128", "--served-model-name", "demo", "--scheduling-policy",
                      "priority"])
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        r = client.completions.create(model="demo", prompt="ROMEO.", max_tokens=3, extra_body={"priority": -5})
        assert r.usage.completion_tokens == 3
    finally:
        s.stop()
    s = RemoteServer(["--num-gpu-blocks-override", "128", "--served-model-name", "demo"])
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={"priority": 1})
        assert e.value.body["param"] == "priority"
    finally:
        s.stop()
