"""Sampling defaults from the model's generation config (vLLM's --generation-config / --override-generation-config)."""

import argparse
import json
import os

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.arg_utils import EngineArgs
from tests.conftest import DEMO_MODEL


def _copy_with_generation_config(src: str, dst: str, gen: dict | None) -> str:
    """The checkpoint's files linked into dst, with gen as its generation_config.json (or none)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "generation_config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    if gen is not None:
        with open(os.path.join(dst, "generation_config.json"), "w") as f:
            json.dump(gen, f)
    return dst


def test_defaults_come_from_the_models_generation_config():
    with open(os.path.join(DEMO_MODEL, "generation_config.json")) as f:
        gen = json.load(f)
    llm = LLM(DEMO_MODEL, num_gpu_blocks_override=64)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p) == (gen["temperature"], gen["top_p"])
    assert p.top_k == SamplingParams().top_k and p.max_tokens == SamplingParams().max_tokens  # not in the file
    neutral = LLM(DEMO_MODEL, num_gpu_blocks_override=64, generation_config="vllm").get_default_sampling_params()
    assert (neutral.temperature, neutral.top_p) == (SamplingParams().temperature, SamplingParams().top_p)


def test_generate_without_params_uses_the_defaults(llama_path, tmp_path):
    model = _copy_with_generation_config(llama_path, str(tmp_path / "m"), {
        "temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.3, "bos_token_id": 0, "eos_token_id": 0})
    llm = LLM(model, num_gpu_blocks_override=64)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.max_tokens, p.repetition_penalty) == (0.0, 5, 1.3)
    prompts = [{"prompt_token_ids": [5, 17, 200, 31, 9]}, {"prompt_token_ids": [44, 3, 120]}]
    implicit = llm.generate(prompts, use_tqdm=False)
    explicit = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3),
                            use_tqdm=False)
    assert [o.outputs[0].token_ids for o in implicit] == [o.outputs[0].token_ids for o in explicit]
    assert all(len(o.outputs[0].token_ids) <= 5 for o in implicit)
    without = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in without] != [o.outputs[0].token_ids for o in implicit]  # penalty applied


def test_a_directory_and_an_override(llama_path, tmp_path):
    plain = _copy_with_generation_config(llama_path, str(tmp_path / "plain"), None)
    other = tmp_path / "gen"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_k": 7, "top_p": 0.5, "min_p": 0.1}))
    p = LLM(plain, num_gpu_blocks_override=64, generation_config=str(other),
            override_generation_config={"top_p": 0.9, "max_new_tokens": 3}).get_default_sampling_params()
    assert (p.top_k, p.top_p, p.min_p, p.max_tokens) == (7, 0.9, 0.1, 3)
    assert LLM(plain, num_gpu_blocks_override=64).get_default_sampling_params().temperature == 1.0  # no file


def test_bad_generation_configs_are_clear_errors(llama_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="generation_config"):
        LLM(llama_path, generation_config=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown fields \\['temprature'\\]"):
        LLM(llama_path, override_generation_config={"temprature": 0.5})
    bad = _copy_with_generation_config(llama_path, str(tmp_path / "bad"), {"top_p": 1.5})
    with pytest.raises(ValueError, match="top_p"):
        LLM(bad)


def test_cli_flags_parse_json():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["m", "--generation-config", "vllm", "--override-generation-config", '{"temperature": 0.5}'])
    args = EngineArgs.from_cli_args(ns)
    assert args.generation_config == "vllm" and args.override_generation_config == {"temperature": 0.5}
    for bad in ("{temperature", "[1, 2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["m", "--override-generation-config", bad])


def test_request_fields_win_over_the_defaults():
    from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    defaults = {"temperature": 0.0, "top_p": 0.5, "max_tokens": 5}
    p = CompletionRequest(prompt="x", temperature=1.0).sampling_params(16, None, defaults)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 0.5, 5)  # max_tokens: the smaller
    p = CompletionRequest(prompt="x", max_tokens=3).sampling_params(3, None, defaults)
    assert (p.temperature, p.max_tokens) == (0.0, 3)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.sampling_params(None, None, defaults).max_tokens is None  # capped per prompt by the server
    assert chat.sampling_params(None, None).temperature == SamplingParams().temperature


def test_server_applies_the_defaults(tmp_path):
    import openai

    from tests.entrypoints.server_utils import RemoteServer

    server = RemoteServer(["--num-gpu-blocks-override", "256", "--served-model-name", "demo",
                           "--override-generation-config", '{"temperature": 0, "max_new_tokens": 5}'])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        implicit = client.completions.create(model="demo", prompt="ROMEO.", max_tokens=24)
        explicit = client.completions.create(model="demo", prompt="ROMEO.", max_tokens=5, temperature=0)
        assert implicit.usage.completion_tokens <= 5 and implicit.choices[0].text == explicit.choices[0].text
        msgs = [{"role": "user", "content": "What say you?"}]
        chat = client.chat.completions.create(model="demo", messages=msgs)  # no max_tokens: the default caps it
        again = client.chat.completions.create(model="demo", messages=msgs, max_tokens=5, temperature=0)
        assert chat.usage.completion_tokens <= 5 and chat.choices[0].message.content == again.choices[0].message.content
    finally:
        server.stop()



def test_cli_generate_takes_unset_flags_from_the_generation_config(llama_path, tmp_path):
    from tests.entrypoints.test_cli import run

    model = _copy_with_generation_config(llama_path, str(tmp_path / "m"), {"temperature": 0.0, "max_new_tokens": 4})
    implicit = run("generate", model, "--prompt", "hello there")
    explicit = run("generate", model, "--prompt", "hello there", "--temperature", "0", "--max-tokens", "4",
                   "--generation-config", "vllm")
    assert implicit.returncode == 0 and explicit.returncode == 0, implicit.stderr + explicit.stderr
    assert implicit.stdout == explicit.stdout and "4 tokens" in implicit.stdout
    longer = run("generate", model, "--prompt", "hello there", "--max-tokens", "6")  # a flag given wins
    assert "6 tokens" in longer.stdout
