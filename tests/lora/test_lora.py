"""LoRA adapters (enable_lora): the oracle is PEFT on Hugging Face transformers, the library that defines the
adapter format. Adapters with random A and B (PEFT initializes B to zero, which would change nothing) are saved
with PEFT's save_pretrained; pagellm must give the PEFT model's greedy tokens and logprobs, in batches that mix
adapters and the base model, and the base model's own where no adapter is named."""

import functools
import os

import pytest
import torch

from pagellm import LLM, LoRARequest, SamplingParams
from pagellm.engine.arg_utils import EngineArgs
from tests.hf_reference import hf_greedy_with, hf_model

peft = pytest.importorskip("peft")

TOL = 1e-4
# name: (architecture, PEFT LoraConfig fields)
ADAPTERS = {
    "llama_all": ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"])),
    "llama_rs": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj", "up_proj"],
                               rank_pattern={"up_proj": 2})),
    "gpt2": ("gpt2", dict(r=6, lora_alpha=12, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"])),
    "qwen2": ("qwen2", dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])),
    # GPT-NeoX: query_key_value's rows are interleaved per head in the checkpoint, reordered when loaded
    "gpt_neox": ("gpt_neox", dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_4h_to_h"])),
}


@functools.cache
def peft_model(tiny_dir: str, name: str, out_dir: str):
    """The PEFT model (for the reference) and its saved adapter directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    arch, fields = ADAPTERS[name]
    base = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, arch), dtype=torch.float32,
                                                attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **fields))
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    path = os.path.join(out_dir, name)
    model.save_pretrained(path)
    model.eval()
    model.generation_config.eos_token_id = None
    return model, path


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    tiny_dir = os.path.dirname(tiny_models["llama"])
    out = str(tmp_path_factory.mktemp("adapters"))
    return {name: peft_model(tiny_dir, name, out) for name in ADAPTERS}


PROMPTS = [[5, 9, 23, 100, 7, 8], [40, 41, 42], list(range(60, 95)), [300, 2, 301, 2, 302]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)


def tokens_and_logprobs(out):
    c = out.outputs[0]
    return c.token_ids, [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]


def assert_close(got, ref):
    assert got[0] == ref[0]
    assert max(abs(a - b) for a, b in zip(got[1], ref[1])) < TOL


@pytest.mark.parametrize("arch, names", [("llama", ["llama_all", "llama_rs"]), ("gpt2", ["gpt2"]),
                                         ("qwen2", ["qwen2"]), ("gpt_neox", ["gpt_neox"])])
def test_mixed_batches_equal_peft_and_the_base_model(tiny_models, adapters, arch, names):
    """Each prompt runs with each adapter and with none, all in one batch (max_loras: every adapter at once)."""
    llm = LLM(tiny_models[arch], enable_lora=True, max_loras=len(names), max_lora_rank=8, num_gpu_blocks_override=128,
              block_size=8)
    loras = [LoRARequest(n, i + 1, adapters[n][1]) for i, n in enumerate(names)]
    jobs = [(p, lr) for p in PROMPTS for lr in [*loras, None]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY, lora_request=[lr for _, lr in jobs],
                        use_tqdm=False)
    for (prompt, lr), out in zip(jobs, outs):
        ref_model = hf_model(tiny_models[arch]) if lr is None else adapters[lr.lora_name][0]
        assert_close(tokens_and_logprobs(out), hf_greedy_with(ref_model, prompt, GREEDY.max_tokens))
    # the adapters change the output (else the test would prove nothing)
    assert outs[0].outputs[0].token_ids != outs[len(names)].outputs[0].token_ids
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_max_loras_runs_one_adapter_at_a_time(tiny_models, adapters, monkeypatch):
    from pagellm.lora.layers import LoRAManager

    seen = []
    set_step = LoRAManager.set_step
    monkeypatch.setattr(LoRAManager, "set_step", lambda self, ids: (seen.append(set(ids.tolist()) - {0}),
                                                                     set_step(self, ids))[1])
    llm = LLM(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=8, num_gpu_blocks_override=128)
    loras = [LoRARequest("llama_all", 1, adapters["llama_all"][1]), LoRARequest("llama_rs", 2, adapters["llama_rs"][1])]
    jobs = [(p, loras[i % 2] if i % 3 else None) for i, p in enumerate(PROMPTS * 2)]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY, lora_request=[lr for _, lr in jobs],
                        use_tqdm=False)
    for (prompt, lr), out in zip(jobs, outs):
        ref_model = hf_model(tiny_models["llama"]) if lr is None else adapters[lr.lora_name][0]
        assert_close(tokens_and_logprobs(out), hf_greedy_with(ref_model, prompt, GREEDY.max_tokens))
    assert seen and max(len(s) for s in seen) == 1 and set().union(*seen) == {1, 2}


def test_max_cpu_loras_keeps_the_most_recent_adapters_loaded(tiny_models, adapters):
    """max_cpu_loras=1: requesting another adapter drops the one no request uses (host memory), and naming the
    dropped one again reads it from its path: the outputs never change."""
    llm = LLM(tiny_models["llama"], enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8,
              num_gpu_blocks_override=128)
    core, manager = llm.llm_engine.core, llm.llm_engine.executor.runner.lora
    loras = [LoRARequest("llama_all", 1, adapters["llama_all"][1]), LoRARequest("llama_rs", 2, adapters["llama_rs"][1])]
    for i, lr in enumerate([loras[0], loras[1], loras[0], loras[1]]):
        out = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=lr, use_tqdm=False)[0]
        assert_close(tokens_and_logprobs(out), hf_greedy_with(adapters[lr.lora_name][0], PROMPTS[0],
                                                              GREEDY.max_tokens))
        assert list(manager.adapters) == [lr.lora_int_id] and core.lora_evictions == i
    a, b = next(iter(manager.adapters[2].weights.values()))
    assert a.device.type == "cpu" and b.device.type == "cpu"  # the device holds only the max_loras slots
    assert LLM(tiny_models["llama"], enable_lora=True, max_loras=2).llm_engine.config.lora.max_cpu_loras == 2
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)"):
        LLM(tiny_models["llama"], enable_lora=True, max_loras=2, max_cpu_loras=1)


def test_prefix_cache_is_per_adapter(tiny_models, adapters):
    """The same prompt with an adapter and without: no block is shared between them (their K/V differ), while a
    second request with the same adapter reuses the first one's blocks."""
    llm = LLM(tiny_models["llama"], enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=64, block_size=8)
    lora = LoRARequest("llama_all", 1, adapters["llama_all"][1])
    prompt = {"prompt_token_ids": list(range(60, 95))}
    base = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    hits0 = llm.llm_engine.get_stats().prefix_cache_hits
    first = llm.generate(prompt, GREEDY, lora_request=lora, use_tqdm=False)[0]
    assert llm.llm_engine.get_stats().prefix_cache_hits == hits0
    again = llm.generate(prompt, GREEDY, lora_request=lora, use_tqdm=False)[0]
    assert llm.llm_engine.get_stats().prefix_cache_hits > hits0
    assert_close(tokens_and_logprobs(again), tokens_and_logprobs(first))
    assert_close(tokens_and_logprobs(first), hf_greedy_with(adapters["llama_all"][0], prompt["prompt_token_ids"], 10))
    assert tokens_and_logprobs(base)[0] != tokens_and_logprobs(first)[0]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_and_preemption_with_adapters(tiny_models, adapters, method):
    """Drafts checked under an adapter (n-grams, or the base model as a draft without the adapter), and requests
    preempted and recomputed from a short pool: still PEFT's."""
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
            if method == "ngram" else {"model": tiny_models["llama"], "num_speculative_tokens": 3})
    llm = LLM(tiny_models["llama"], enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=12, block_size=4,
              speculative_config=spec, max_num_seqs=4)
    lora = LoRARequest("llama_all", 1, adapters["llama_all"][1])
    prompts = [[11, 12, 13, 14] * 3, [5, 6, 5, 6, 5, 6], [70, 71, 72, 70, 71, 72]]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert_close(tokens_and_logprobs(out), hf_greedy_with(adapters["llama_all"][0], prompt, 20))
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.spec_num_draft_tokens > 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_bad_adapters_are_clear_errors_and_the_engine_goes_on(tiny_models, adapters, tmp_path):
    llm = LLM(tiny_models["llama"], enable_lora=True, max_lora_rank=6, num_gpu_blocks_override=64)
    prompt = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(ValueError, match="rank 8, more than max_lora_rank=6"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("big", 1, adapters["llama_all"][1]))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("missing", 2, str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="targets transformer.h.0.attn.c_attn"):  # a GPT-2 adapter on LLaMA
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("other", 3, adapters["gpt2"][1]))
    lora = LoRARequest("rs", 4, adapters["llama_rs"][1])
    assert len(llm.generate(prompt, GREEDY, lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids) == 10
    with pytest.raises(ValueError, match="lora_int_id 4 is already adapter"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("rs2", 4, adapters["llama_all"][1]))
    with pytest.raises(ValueError, match="2 LoRA requests for 1 prompts"):
        llm.generate(prompt, GREEDY, lora_request=[lora, lora])
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("zero", 0, "x")
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("arch, names, pp", [("llama", ["llama_all", "llama_rs"], 1), ("gpt2", ["gpt2"], 1),
                                             ("gpt_neox", ["gpt_neox"], 1), ("llama", ["llama_all", "llama_rs"], 2),
                                             ("gpt2", ["gpt2"], 2)])
def test_parallel_adapters_equal_peft(tiny_models, adapters, arch, names, pp):
    """TP=2: each rank keeps its slice of every adapter (B's rows of column-parallel layers, packed parts one by one;
    A's inputs of row-parallel layers, whose partial updates the all-reduce sums with the base's). PP=2: each stage
    keeps its own layers' A and B."""
    loras = [LoRARequest(n, i + 1, adapters[n][1]) for i, n in enumerate(names)]
    jobs = [(p, lr) for p in PROMPTS[:3] for lr in [*loras, None]]
    parallel = {"tensor_parallel_size": 2} if pp == 1 else {"pipeline_parallel_size": pp}
    with LLM(tiny_models[arch], **parallel, enable_lora=True, max_loras=len(names), max_lora_rank=8,
             num_gpu_blocks_override=128, block_size=8) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY, lora_request=[lr for _, lr in jobs],
                            use_tqdm=False)
        other = adapters["llama_all" if arch == "gpt2" else "gpt2"][1]  # another architecture's adapter
        with pytest.raises(ValueError, match="targets"):  # refused on rank 0 before any other rank is told
            llm.llm_engine.add_lora(LoRARequest("other", 9, other))
        assert len(llm.generate({"prompt_token_ids": [3, 4]}, GREEDY, lora_request=loras[0], use_tqdm=False)) == 1
    for (prompt, lr), out in zip(jobs, outs):
        ref_model = hf_model(tiny_models[arch]) if lr is None else adapters[lr.lora_name][0]
        assert_close(tokens_and_logprobs(out), hf_greedy_with(ref_model, prompt, GREEDY.max_tokens))


def test_lora_needs_enable_lora_and_a_native_model(tiny_models, adapters):
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="needs enable_lora=True"):
        llm.generate({"prompt_token_ids": [1, 2]}, GREEDY, lora_request=LoRARequest("a", 1, adapters["llama_rs"][1]))
    with pytest.raises(ValueError, match="transformers fallback"):
        EngineArgs(model=tiny_models["stablelm"], enable_lora=True).create_engine_config()
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        EngineArgs(model=tiny_models["llama"], enable_lora=True, max_lora_rank=0).create_engine_config()


def test_server_serves_adapters_by_name(tiny_models, adapters):
    """`pagellm serve --enable-lora --lora-modules name=path ...`: /v1/models lists each adapter with the base model
    as parent, a request naming an adapter gets PEFT's tokens (the offline engine's, checked against PEFT above),
    the base name gets the base model's, and an unknown name is a 404."""
    import httpx

    from tests.entrypoints.server_utils import RemoteServer

    base = tiny_models["llama"]
    mods = [f"all={adapters['llama_all'][1]}", f'{{"name": "rs", "path": "{adapters["llama_rs"][1]}"}}']
    server = RemoteServer([base, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules", *mods,
                           "--num-gpu-blocks-override", "64"])
    try:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        got = {}
        for name in (base, "all", "rs"):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": name, "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "return_token_ids": True})
            got[name] = r.json()["choices"][0]["token_ids"]
        missing = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
        card = httpx.get(server.url + "/v1/models/rs").json()
    finally:
        server.stop()
    assert [(m["id"], m.get("parent")) for m in models] == [(base, None), ("all", base), ("rs", base)]
    assert card["root"] == adapters["llama_rs"][1]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert got[base] == hf_greedy_with(hf_model(base), PROMPTS[0], 10)[0]
    assert got["all"] == hf_greedy_with(adapters["llama_all"][0], PROMPTS[0], 10)[0]
    assert got["rs"] == hf_greedy_with(adapters["llama_rs"][0], PROMPTS[0], 10)[0]


def test_a_bad_lora_module_stops_the_server_at_start_up(tiny_models, adapters):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "serve", tiny_models["llama"],
                          "--enable-lora", "--max-lora-rank", "4", "--lora-modules", f"a={adapters['llama_all'][1]}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "more than max_lora_rank=4" in out.stdout + out.stderr


def test_adapters_loaded_and_unloaded_while_the_server_runs(tiny_models, adapters):
    """--allow-runtime-lora-updating: /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and
    messages); a refused adapter is a 400 and changes nothing; an adapter in use cannot be dropped."""
    import httpx

    from tests.entrypoints.server_utils import RemoteServer

    base = tiny_models["llama"]
    server = RemoteServer([base, "--enable-lora", "--max-lora-rank", "8", "--allow-runtime-lora-updating",
                           "--num-gpu-blocks-override", "64", "--api-key", "k"])
    auth = {"Authorization": "Bearer k"}

    def post(route, **body):
        return httpx.post(server.url + route, json=body, headers=auth, timeout=60)

    def complete(model):
        r = post("/v1/completions", model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0, return_token_ids=True)
        return r.status_code, r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.json()

    try:
        assert complete("all")[0] == 404
        r = post("/v1/load_lora_adapter", lora_name="all", lora_path=adapters["llama_all"][1])
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'all' added successfully."
        status, tokens = complete("all")
        assert status == 200 and tokens == hf_greedy_with(adapters["llama_all"][0], PROMPTS[0], 10)[0]
        again = post("/v1/load_lora_adapter", lora_name="all", lora_path=adapters["llama_rs"][1])
        other = post("/v1/load_lora_adapter", lora_name="gpt2", lora_path=adapters["gpt2"][1])  # wrong architecture
        models = [m["id"] for m in httpx.get(server.url + "/v1/models", headers=auth).json()["data"]]
        r = post("/v1/unload_lora_adapter", lora_name="all")
        gone = complete("all")[0]
        missing = post("/v1/unload_lora_adapter", lora_name="all")
        no_key = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"})
        assert server.wait_pool_free()
    finally:
        server.stop()
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert other.status_code == 400 and "targets transformer.h.0.attn.c_attn" in other.json()["error"]["message"]
    assert models == [base, "all"]
    assert r.status_code == 200 and "removed successfully" in r.text and gone == 404
    assert missing.status_code == 404 and "cannot be found" in missing.json()["error"]["message"]
    assert no_key.status_code == 401


def test_an_adapter_in_use_cannot_be_unloaded(tiny_models, adapters):
    llm = LLM(tiny_models["llama"], enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    lora = LoRARequest("all", 1, adapters["llama_all"][1])
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=5), lora_request=lora)
    engine.step()
    with pytest.raises(ValueError, match="in use by 1 request"):
        engine.remove_lora(1)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.remove_lora(1) and not engine.remove_lora(1)
    assert 1 not in engine.executor.runner.lora.adapters


def test_adapter_requests_are_batch_invariant_with_every_feature(tiny_models, adapters):
    """Seeded sampling with n=2, logprobs, a regex-constrained output and stop strings through an adapter: each gives
    the same output alone as in a batch mixing adapters, the base model and prefills."""
    from pagellm.sampling_params import StructuredOutputsParams

    llm = LLM(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8, num_gpu_blocks_override=256,
              block_size=8, max_num_batched_tokens=48)
    a = LoRARequest("llama_all", 1, adapters["llama_all"][1])
    b = LoRARequest("llama_rs", 2, adapters["llama_rs"][1])
    jobs = [
        (PROMPTS[0], SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=12, logprobs=2, ignore_eos=True), a),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                    structured_outputs=StructuredOutputsParams(regex="[a-z]{2,5}( [a-z]{2,5}){1,2}")),
         b),
        (PROMPTS[2], SamplingParams(temperature=0.7, seed=6, max_tokens=15, stop=["e"]), a),
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), None),
    ]

    def run(batch):
        outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in batch], [sp for _, sp, _ in batch],
                            lora_request=[lr for _, _, lr in batch], use_tqdm=False)
        return [[(c.token_ids, c.text, [round(d[t].logprob, 4) for d, t in zip(c.logprobs, c.token_ids)]
                  if c.logprobs else None) for c in o.outputs] for o in outs]

    alone = [run([job])[0] for job in jobs]
    assert run(jobs) == alone
    assert all(len(c[0]) > 0 for o in alone for c in o)


def test_emulated_cuda_graphs_replay_the_adapters_update(tiny_models, adapters, monkeypatch):
    """The GPU path: decode batches replay graphs that hold every slot's update, each token masked to its slot by
    the step's tok_slot buffer (base-model tokens: zero update); adapters move in and out of slots between steps."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    llm = LLM(tiny_models["llama"], enable_lora=True, max_loras=2, max_lora_rank=8, num_gpu_blocks_override=128,
              block_size=8, attention_backend="torch_ref", max_num_seqs=4)
    runner = llm.llm_engine.executor.runner
    assert runner.graphs is not None and runner.lora.always
    loras = [LoRARequest("llama_all", 1, adapters["llama_all"][1]), LoRARequest("llama_rs", 2, adapters["llama_rs"][1]),
             LoRARequest("qwen_on_llama", 3, adapters["llama_all"][1])]  # a third id: the slots must turn over
    jobs = [(p, lr) for p in PROMPTS[:3] for lr in [*loras, None]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], GREEDY, lora_request=[lr for _, lr in jobs],
                        use_tqdm=False)
    for (prompt, lr), out in zip(jobs, outs):
        ref_model = hf_model(tiny_models["llama"]) if lr is None else adapters[lr.lora_name.replace(
            "qwen_on_llama", "llama_all")][0]
        assert_close(tokens_and_logprobs(out), hf_greedy_with(ref_model, prompt, GREEDY.max_tokens))
    assert sum(runner.graphs.replays.values()) > 10


@pytest.mark.parametrize("arch", [a for a in __import__("tests.conftest", fromlist=["ARCHS"]).ARCHS
                                  if a not in ("llama_tied_rope", "opt_post_ln")])
def test_every_native_architecture_takes_an_adapter_on_all_its_projections(tiny_models, arch, tmp_path):
    """A random rank-8 adapter on every attention and MLP projection (scripts/check_cuda.py's, PEFT's file format),
    against transformers with the same update merged into its weights (W + alpha / r * B A): packed, interleaved,
    transposed (Conv1D), MoE routers, biased and normalised layouts alike."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("check_cuda", os.path.join(
        os.path.dirname(__file__), "..", "..", "scripts", "check_cuda.py"))
    check_cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_cuda)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32, attn_implementation="eager")
    path = check_cuda.random_adapter(hf, str(tmp_path / "adapter"))
    hf.eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(tiny_models[arch], enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=128, block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=LoRARequest("r", 1, path),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert_close(tokens_and_logprobs(out), hf_greedy_with(hf, prompt, GREEDY.max_tokens))
    # the adapter matters: the base model's own output is another one
    base_tokens, base_lps = hf_greedy_with(hf_model(tiny_models[arch]), PROMPTS[0], GREEDY.max_tokens)
    got_tokens, got_lps = tokens_and_logprobs(outs[0])
    assert got_tokens != base_tokens or max(abs(x - y) for x, y in zip(got_lps, base_lps)) > 1e-2
