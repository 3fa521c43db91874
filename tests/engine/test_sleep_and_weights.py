"""Between rollouts (RL post-training, vLLM's calls): sleep mode frees the weights' and the KV cache's memory and
takes it back; new weights from a trainer (update_weights, a worker extension's model.load_weights) or from disk
(reload_weights); reset_prefix_cache; collective_rpc on every rank. Outputs are checked against transformers on the
same weights; the memory freed is read from the storages themselves."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.core import EngineSleepingError
from tests.hf_reference import hf_greedy, hf_greedy_with, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
PROMPTS = [list(range(3, 43)), [7, 8, 9, 10, 11], list(range(100, 135))]  # 40 and 35 tokens: full blocks to cache
EXT = "tests.engine.rl_worker_ext.Probe"


def run(llm: LLM, prompts=PROMPTS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)


def assert_matches(outs, reference) -> None:
    """Greedy tokens equal, logprobs close: reference(prompt) -> (tokens, logprobs)."""
    for p, out in zip(PROMPTS, outs):
        tokens, lps = reference(p)
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)


def perturbed(path: str, seed: int = 1):
    """transformers' model of the checkpoint with every weight moved (a trainer's next policy), and its state dict."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return hf, {k: v.clone() for k, v in hf.state_dict().items()}


def storage_bytes(worker) -> tuple[int, int]:
    """(bytes under the model's parameters, bytes under the KV cache) on this rank now."""
    r = worker.model_runner
    return (sum(p.untyped_storage().nbytes() for p in r.model.parameters()),
            sum(t.untyped_storage().nbytes() for t in r.cache_tensors()))


def host_copies(worker) -> int:
    """Bytes of host copies sleep mode keeps (0 when awake)."""
    m = worker.memory
    return 0 if m is None else sum(c.numel() for _, _, c in m.weights if c is not None)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_sleep_frees_memory_and_wakes_to_the_same_outputs(llama_path, graphs, monkeypatch):
    if graphs:  # the decode graphs are dropped at sleep and captured again at wake-up (emulated on CPU)
        monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    llm = LLM(llama_path, enable_sleep_mode=True, max_model_len=128, num_gpu_blocks_override=64)
    assert_matches(run(llm), lambda p: hf_greedy(llama_path, p, GREEDY.max_tokens))
    weights, cache = llm.collective_rpc(storage_bytes)[0]
    assert weights > 0 and cache > 0
    if graphs:
        assert llm.collective_rpc(lambda w: w.model_runner.graphs is not None) == [True]

    llm.sleep(level=1)  # on a CPU the weights stay (they are in host memory), the cache is freed
    assert llm.is_sleeping()
    assert llm.collective_rpc(storage_bytes) == [(weights, 0)]
    assert llm.collective_rpc(host_copies) == [0]
    with pytest.raises(EngineSleepingError, match="wake_up"):
        run(llm)
    with pytest.raises(ValueError, match="asleep already"):
        llm.sleep(1)
    llm.wake_up(tags=["kv_cache"])
    assert llm.is_sleeping()
    assert llm.collective_rpc(storage_bytes) == [(weights, cache)]
    llm.wake_up(tags=["weights"])
    assert not llm.is_sleeping()
    assert llm.collective_rpc(storage_bytes) == [(weights, cache)]
    if graphs:
        assert llm.collective_rpc(lambda w: w.model_runner.graphs is not None) == [True]
    outs = run(llm)
    assert all(o.num_cached_tokens == 0 for o in outs)  # the prefix cache was forgotten with the KV cache
    assert_matches(outs, lambda p: hf_greedy(llama_path, p, GREEDY.max_tokens))

    llm.sleep(level=2)  # the parameters freed without a copy: they come back uninitialized and are reloaded
    assert llm.collective_rpc(storage_bytes) == [(0, 0)]
    assert 0 < llm.collective_rpc(host_copies)[0] < weights // 10  # (the rotary tables and such are kept)
    llm.wake_up(["kv_cache"])
    assert llm.collective_rpc(storage_bytes) == [(0, cache)]
    llm.wake_up(["weights"])
    assert llm.collective_rpc(storage_bytes) == [(weights, cache)]
    llm.reload_weights()
    assert_matches(run(llm), lambda p: hf_greedy(llama_path, p, GREEDY.max_tokens))


def test_sleep_refusals(llama_path, tiny_models):
    llm = LLM(llama_path, max_model_len=128, num_gpu_blocks_override=64)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        llm.sleep()
    llm = LLM(llama_path, enable_sleep_mode=True, max_model_len=128, num_gpu_blocks_override=64)
    with pytest.raises(ValueError, match="level must be 1 or 2"):
        llm.sleep(3)
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(["weight"])
    engine = llm.llm_engine
    engine.add_request("busy", {"prompt_token_ids": [1, 2, 3]}, GREEDY)
    engine.step()
    with pytest.raises(ValueError, match="idle engine: 1 request"):
        llm.sleep()
    with pytest.raises(ValueError, match="idle engine"):
        llm.update_weights({})
    assert not llm.reset_prefix_cache()  # a request holds blocks
    engine.abort_request("busy")
    assert llm.reset_prefix_cache()
    llm.sleep()
    with pytest.raises(ValueError, match="weights are asleep"):
        llm.reload_weights()
    llm.wake_up()
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_hybrid_model_sleeps_with_its_recurrent_states(tiny_models):
    """A model with Mamba layers: the recurrent states (and their prefix-cache checkpoints) sleep with the cache."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, enable_sleep_mode=True, max_model_len=128, num_gpu_blocks_override=64, max_num_seqs=4)
    before = [o.outputs[0].token_ids for o in run(llm)]
    states = llm.collective_rpc(lambda w: sum(t.untyped_storage().nbytes() for layer in w.model_runner.states
                                              for t in layer))[0]
    assert states > 0
    llm.sleep(1)
    assert llm.collective_rpc(lambda w: sum(t.untyped_storage().nbytes() for layer in w.model_runner.states
                                            for t in layer)) == [0]
    llm.wake_up()
    outs = run(llm)
    assert [o.outputs[0].token_ids for o in outs] == before
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(path, p, GREEDY.max_tokens)[0] for p in PROMPTS]


def test_update_weights_matches_transformers_on_the_new_weights(llama_path):
    llm = LLM(llama_path, max_model_len=128, num_gpu_blocks_override=64)
    run(llm)  # the prompts' blocks are now in the prefix cache, computed with the old weights
    hf, state = perturbed(llama_path)
    assert llm.update_weights(state) == 15  # q, k, v and gate, up land in packed parameters
    outs = run(llm)
    assert all(o.num_cached_tokens == 0 for o in outs)  # stale K/V is not served
    assert_matches(outs, lambda p: hf_greedy_with(hf, p, GREEDY.max_tokens))
    # a partial update (one layer's MLP back to the checkpoint's) and its reference
    orig = hf_model(llama_path).state_dict()
    part = {k: v for k, v in orig.items() if k.startswith("model.layers.1.mlp.")}
    assert llm.update_weights(part.items()) == 2
    hf.load_state_dict(part, strict=False)
    assert_matches(run(llm), lambda p: hf_greedy_with(hf, p, GREEDY.max_tokens))
    with pytest.raises(ValueError, match="no parameter"):
        llm.update_weights({"model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights({"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="name, tensor"):
        llm.update_weights([("model.norm.weight", [1.0])])
    llm.reload_weights()  # back to the checkpoint on disk
    assert_matches(run(llm), lambda p: hf_greedy(llama_path, p, GREEDY.max_tokens))


def test_tensor_parallel_updates_and_worker_extension(llama_path):
    """TP=2: every rank takes its slice of a whole tensor (update_weights, and an extension's model.load_weights);
    collective_rpc answers per rank; a method's error names the rank and leaves the engine working."""
    llm = LLM(llama_path, tensor_parallel_size=2, max_model_len=128, num_gpu_blocks_override=64,
              worker_extension_cls=EXT, enable_sleep_mode=True)
    try:
        assert llm.collective_rpc("where") == [(0, 64), (1, 64)]  # q 32 + k 16 + v 16 rows of 128 per rank
        vocab = 512  # a closure crosses to rank 1 too: each rank holds half the vocabulary's rows
        assert llm.collective_rpc(lambda w, d: (w.rank, w.model_runner.model.lm_head.weight.shape[0] * 2 == vocab + d),
                                  kwargs={"d": 0}) == [(0, True), (1, True)]
        hf, state = perturbed(llama_path, seed=2)
        qkv = [k for k in state if k.startswith("model.layers.0.self_attn.") and k.endswith("proj.weight")]
        assert llm.collective_rpc("load_weight", args=(qkv[0], state[qkv[0]])) == \
            [["model.layers.0.self_attn.qkv_proj.weight"]] * 2
        llm.update_weights({k: v for k, v in state.items() if k != qkv[0]})
        assert_matches(run(llm), lambda p: hf_greedy_with(hf, p, GREEDY.max_tokens))
        with pytest.raises(ValueError, match="refused on rank 0"):
            llm.collective_rpc("fail")
        with pytest.raises(ValueError, match="no method 'nope'"):
            llm.collective_rpc("nope")
        held = llm.collective_rpc("weight_bytes")
        llm.sleep(2)
        assert llm.collective_rpc("weight_bytes") == [0, 0]
        llm.wake_up()
        assert llm.collective_rpc("weight_bytes") == held
        llm.update_weights(state)  # every weight again, after a level-2 sleep
        assert_matches(run(llm), lambda p: hf_greedy_with(hf, p, GREEDY.max_tokens))
    finally:
        llm.shutdown()


def test_worker_extension_refusals(llama_path):
    with pytest.raises(ValueError, match="cannot be imported"):
        LLM(llama_path, max_model_len=64, num_gpu_blocks_override=16, worker_extension_cls="tests.nowhere.Ext")
    with pytest.raises(ValueError, match="redefines the worker's \\['sleep'\\]"):
        LLM(llama_path, max_model_len=64, num_gpu_blocks_override=16,
            worker_extension_cls="tests.engine.test_sleep_and_weights.Clash")


class Clash:
    def sleep(self, level):  # would hide the worker's own
        pass


@pytest.mark.parametrize("name,kwargs", [("llama", {"quantization": "int8"}), ("deepseek_v2", {})],
                         ids=["int8", "deepseek-absorbed"])
def test_weights_not_updatable_in_place_are_reloaded(tiny_models, name, kwargs):
    """Quantized weights and DeepSeek's absorbed attention cannot take tensors in place (refused, naming reload);
    reload_weights rebuilds them beside the live ones and copies every tensor over, after a level-2 sleep too."""
    path = tiny_models[name]
    llm = LLM(path, max_model_len=128, num_gpu_blocks_override=64, enable_sleep_mode=True, **kwargs)
    before = [o.outputs[0].token_ids for o in run(llm)]
    with pytest.raises(ValueError, match="reload_weights"):
        llm.update_weights({"model.norm.weight": torch.ones(hf_model(path).config.hidden_size)})
    llm.sleep(2)
    llm.wake_up()
    llm.reload_weights()
    assert [o.outputs[0].token_ids for o in run(llm)] == before
    if not kwargs:
        assert before == [hf_greedy(path, p, GREEDY.max_tokens)[0] for p in PROMPTS]


def test_server_dev_routes(llama_path):
    """`pagellm serve --server-dev-mode` (vLLM's dev-mode routes): /sleep, /wake_up, /is_sleeping, /reset_prefix_cache
    and /collective_rpc; requests get 503 while asleep, and a call that needs an idle engine 409 while one runs."""
    import httpx

    from tests.entrypoints.server_utils import RemoteServer

    server = RemoteServer([llama_path, "--enable-sleep-mode", "--server-dev-mode", "--worker-extension-cls", EXT,
                           "--max-model-len", "128", "--num-gpu-blocks-override", "64"])
    url = server.url

    def complete():
        return httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "return_token_ids": True})

    try:
        first = complete().json()["choices"][0]["token_ids"]
        assert first == hf_greedy(llama_path, PROMPTS[0], 8)[0]
        assert httpx.post(url + "/collective_rpc", json={"method": "where"}).json() == {"results": [[0, 128]]}
        assert httpx.post(url + "/sleep", params={"level": 2}).status_code == 200
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": True}
        assert server.metric("pagellm:engine_sleep_state") == 1
        asleep = complete()
        assert asleep.status_code == 503 and "wake_up" in asleep.json()["error"]["message"]
        assert httpx.post(url + "/collective_rpc", json={"method": "weight_bytes"}).json() == {"results": [0]}
        assert httpx.post(url + "/wake_up", params={"tags": ["weights"]}).status_code == 200
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": True}
        assert httpx.post(url + "/collective_rpc", json={"method": "reload_weights"}).json() == {"results": [None]}
        assert httpx.post(url + "/wake_up").status_code == 200
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": False}
        assert server.metric("pagellm:engine_sleep_state") == 0
        assert complete().json()["choices"][0]["token_ids"] == first
        assert httpx.post(url + "/reset_prefix_cache").status_code == 200

        bad = httpx.post(url + "/collective_rpc", json={"method": "fail"})
        assert bad.status_code == 400 and bad.json()["error"]["message"] == "refused on rank 0"
        assert httpx.post(url + "/wake_up", params={"tags": ["weight"]}).status_code == 400
        assert httpx.post(url + "/sleep", params={"level": 5}).status_code == 400
        with ThreadPoolExecutor(2) as pool:  # a request reaches the core just before /sleep does
            stall = pool.submit(httpx.post, url + "/collective_rpc", json={"method": "stall", "args": [2.0]},
                                timeout=60)
            time.sleep(0.5)
            running = pool.submit(complete)
            time.sleep(0.5)
            busy = httpx.post(url + "/sleep", timeout=60)
            assert busy.status_code == 409 and "idle engine: 1 request" in busy.json()["error"]["message"]
            assert stall.result().json() == {"results": [None]}
            assert running.result().json()["choices"][0]["token_ids"] == first
        assert httpx.get(url + "/is_sleeping").json() == {"is_sleeping": False}
        assert server.wait_pool_free()
    finally:
        server.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device memory, real CUDA graphs)")
def test_sleep_on_cuda_gives_the_memory_back_and_recaptures_the_graphs(llama_path):
    llm = LLM(llama_path, device="cuda", enable_sleep_mode=True, max_model_len=128, num_gpu_blocks_override=64)
    before = [o.outputs[0].token_ids for o in run(llm)]
    assert llm.collective_rpc(lambda w: w.model_runner.graphs is not None) == [True]
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    weights, cache = llm.collective_rpc(storage_bytes)[0]
    llm.sleep(1)
    assert torch.cuda.memory_allocated() <= held - weights - cache
    llm.wake_up()
    assert [o.outputs[0].token_ids for o in run(llm)] == before
    hf, state = perturbed(llama_path)
    llm.update_weights(state)
    assert_matches(run(llm), lambda p: hf_greedy_with(hf, p, GREEDY.max_tokens))


def test_device_memory_keeps_ties_views_and_buffers():
    """The level-1 path of a GPU (host copies of every weight) on CPU tensors: tied parameters stay tied, a view
    held as an attribute sees the memory again, buffers and parameters get their bytes back; level 2 copies only
    what a non-parameter (a buffer, an attribute) holds."""
    from types import SimpleNamespace

    from pagellm.worker.worker import DeviceMemory

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.weight = a.weight  # tied
    a.register_buffer("table", torch.arange(5.0))
    a.rows = a.weight.data[2:4]  # a view kept as a plain attribute
    model = torch.nn.Sequential(a, b)
    cache = torch.randn(4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accel = SimpleNamespace(type="accelerator")  # not a CPU: weights are copied out and freed
    for level in (1, 2):
        mem = DeviceMemory()
        mem.free(level, [model], [cache], accel)
        assert all(t.untyped_storage().nbytes() == 0 for t in (a.weight, a.bias, b.bias, a.table, a.rows, cache))
        copied = sum(c.numel() for _, _, c in mem.weights if c is not None)
        # level 2: the buffer, and the tied weight because a plain attribute views it; not the biases
        assert copied == (4 * (64 + 8 + 8) + 4 * 5 if level == 1 else 4 * 64 + 4 * 5)
        mem.restore_weights()
        mem.restore_caches()
        assert b.weight is a.weight and a.rows.data_ptr() == a.weight.data_ptr() + 2 * 8 * 4
        assert torch.equal(cache, torch.zeros(4, 4))
        assert torch.equal(a.table, torch.arange(5.0))
        if level == 1:
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            assert torch.equal(a.rows, before["0.weight"][2:4])
