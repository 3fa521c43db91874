"""A failing model step fails the requests in it, frees their blocks, and the engine keeps serving."""

from pagellm import LLM, SamplingParams


def fail_nth_call(monkeypatch, obj, name: str, n: int) -> None:
    """The n-th call of obj.name raises a simulated device failure; the others run."""
    real = getattr(obj, name)
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated device failure")
        return real(*args)

    monkeypatch.setattr(obj, name, flaky)


def test_failed_step_fails_its_requests_and_the_engine_goes_on(llama_path, monkeypatch):
    llm = LLM(llama_path, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    fail_nth_call(monkeypatch, engine.executor.runner, "execute_model", 2)
    engine.add_request("a", "The quick", SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    outs = engine.step()  # raises inside: request a fails
    assert [o.request_id for o in outs] == ["a"]
    assert outs[0].finished and outs[0].error == "RuntimeError: simulated device failure"
    assert outs[0].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests() and engine.scheduler.kv.num_free_blocks == 64
    out = llm.generate("The quick", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
