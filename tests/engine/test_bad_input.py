"""Bad input fails before any work, names the field and the limit, and leaves the engine usable."""

import json
import os
import shutil

import pytest

from pagellm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(llama_path, max_model_len=64, num_gpu_blocks_override=64)


def assert_still_works(llm):
    out = llm.generate("The quick", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    sched = llm.llm_engine.scheduler
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == 64


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    assert_still_works(llm)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"prompt has 80 tokens, but max_model_len is 64"):
        llm.generate({"prompt_token_ids": [5] * 80}, use_tqdm=False)
    assert_still_works(llm)


def test_prompt_plus_max_tokens_over_max_model_len(llm):
    with pytest.raises(ValueError,
                       match=r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70 exceeds max_model_len \(64\)"):
        llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10), use_tqdm=False)
    assert_still_works(llm)


def test_one_bad_prompt_in_a_batch_runs_nothing(llm):
    with pytest.raises(ValueError, match="prompt 1: prompt must not be empty"):
        llm.generate(["fine", "", "also fine"], use_tqdm=False)
    assert_still_works(llm)


def test_token_ids_outside_the_vocabulary(llm):
    vocab = llm.llm_engine.config.model.vocab_size
    with pytest.raises(ValueError, match=rf"prompt_token_ids must be in \[0, {vocab}\)"):
        llm.generate({"prompt_token_ids": [1, vocab]}, use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids must hold token ids"):
        llm.generate("x", SamplingParams(stop_token_ids=[vocab + 5]), use_tqdm=False)
    assert_still_works(llm)


def test_more_kv_blocks_than_exist(llama_path):
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=4)  # 16 slots
    with pytest.raises(ValueError, match=r"needs up to 5 KV cache blocks .* the cache has 4"):
        llm.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=10), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [5] * 4}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), r"temperature must be >= 0, got -0.1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-2), r"top_k must be an integer >= 1, or 0 / -1 to disable, got -2"),
    (dict(max_tokens=0), r"max_tokens must be an integer >= 1, got 0"),
    (dict(n=0), r"n must be an integer >= 1, got 0"),
])
def test_invalid_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_k_zero_and_minus_one_disable_it():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0).top_k == 0


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LLM(str(tmp_path))


def test_missing_weights(tmp_path, llama_path):
    d = tmp_path / "noweights"
    shutil.copytree(llama_path, d, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        LLM(str(d))


def _with_config(tmp_path, src, **changes):
    d = tmp_path / "changed"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_unknown_model_type_is_a_clear_error(tmp_path, llama_path):
    path = _with_config(tmp_path, llama_path, model_type="fancy_new", architectures=["FancyNewForCausalLM"])
    from pagellm.models.registry import supported_architectures

    with pytest.raises(ValueError, match=r"(?s)fancy_new.*Natively supported architectures: ") as err:
        LLM(path)
    assert str(err.value).endswith(", ".join(supported_architectures()) + ".")  # every one, in order


def test_unknown_architecture_name_runs_natively_by_model_type(tmp_path, llama_path):
    path = _with_config(tmp_path, llama_path, architectures=["FancyNewForCausalLM"])
    llm = LLM(path)
    assert llm.llm_engine.config.model.architecture == "LlamaForCausalLM"


def test_model_without_the_attention_interface_is_refused_with_the_reason():
    from transformers import FalconConfig, T5Config

    from pagellm.models.registry import resolve_architecture

    with pytest.raises(ValueError, match=r"FalconForCausalLM's attention does not go through transformers' "
                                         r"attention interface.*Natively supported architectures: "
                                         r"BailingHybridForCausalLM, BambaForCausalLM, DeepseekV2ForCausalLM"):
        resolve_architecture(["FalconForCausalLM"], FalconConfig())
    with pytest.raises(ValueError, match="encoder-decoder"):
        resolve_architecture(["T5ForConditionalGeneration"], T5Config())


def test_max_model_len_over_the_models(llama_path):
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) is larger than the model's maximum \(256\)"):
        LLM(llama_path, max_model_len=4096)


def test_unknown_llm_argument(llama_path):
    with pytest.raises(TypeError, match="unknown LLM arguments"):
        LLM(llama_path, gpu_blocks=3)


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match="got 2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_bin_weights_load_too(tmp_path, llama_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    shutil.copytree(llama_path, d, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(os.path.join(llama_path, "model.safetensors")), d / "pytorch_model.bin")
    a = LLM(llama_path).generate("hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    b = LLM(str(d)).generate("hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_sharded_safetensors_load_too(tmp_path, llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama_path).save_pretrained(d, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(llama_path).save_pretrained(d)
    assert (d / "model.safetensors.index.json").exists()
    a = LLM(llama_path).generate("hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    b = LLM(str(d)).generate("hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_dummy_weights_need_no_weight_files(tmp_path, llama_path):
    d = tmp_path / "dummy"
    shutil.copytree(llama_path, d, ignore=shutil.ignore_patterns("*.safetensors"))
    out = LLM(str(d), load_format="dummy").generate("hi", SamplingParams(max_tokens=4, ignore_eos=True),
                                                     use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_prompt_that_cannot_fit_queues_nothing(llama_path):
    """LLM.generate checks every prompt (the KV-cache fit included) before queueing any."""
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=8)  # 32 token slots
    engine = llm.llm_engine
    ok = {"prompt_token_ids": [5, 6, 7]}
    too_big = {"prompt_token_ids": list(range(5, 25))}
    with pytest.raises(ValueError, match=r"prompt 1: the request needs up to 10 KV cache blocks"):
        llm.generate([ok, too_big], SamplingParams(max_tokens=20), use_tqdm=False)
    assert not engine.has_unfinished_requests()
    outs = llm.generate([ok], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 2


def test_prefix_cache_counters_count_each_admitted_request_once(llama_path):
    """A request that waits for blocks is looked up at every admission attempt; it counts once."""
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=12)
    prompts = [{"prompt_token_ids": [5 + i] * 36} for i in range(3)]  # 36 + 4 tokens: 10 of the 12 blocks
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions == 0 and llm.llm_engine.stats.num_steps > 6  # the others waited, step after step
    assert stats.prefix_cache_queries == 3 * 36 and stats.prefix_cache_hits == 0
