"""The model registry, the weight-loading layouts and the fallback's behaviour around the parity tests."""

import logging
import re
import subprocess
import sys

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.models.registry import FALLBACK, MODELS, get_model_class, model_table
from tests.conftest import ARCHS


def test_every_registered_architecture_imports_and_has_a_parity_fixture(tiny_models, vlm_models):
    import json

    covered = set()
    for path in [tiny_models[arch] for arch in ARCHS] + list(vlm_models.values()):  # llava: tests/multimodal
        with open(f"{path}/config.json") as f:
            covered.update(json.load(f)["architectures"])
    for arch in MODELS:
        assert get_model_class(arch).__name__ == arch
        assert arch == FALLBACK or arch in covered, f"{arch} has no HF parity fixture"


def test_list_models_prints_every_architecture_with_its_features():
    out = subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "list-models"], capture_output=True,
                         text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 1 + len(model_table())
    for arch, entry in MODELS.items():
        line = next(x for x in lines if re.search(rf"\b{arch}\b", x))  # (MambaForCausalLM in FalconMamba...)
        assert all(f in line for f in entry.features)


def test_fallback_says_so_in_the_log(tiny_models, caplog):
    with caplog.at_level(logging.WARNING):
        llm = LLM(tiny_models["stablelm"], num_gpu_blocks_override=64)
    assert llm.llm_engine.config.model.architecture == FALLBACK
    assert any("StableLmForCausalLM has no native pagellm implementation: running it on the transformers "
               "fallback" in r.getMessage() for r in caplog.records)


def _hf_state(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_moe_experts_load_from_per_expert_and_stacked_layouts(tiny_models):
    """Hub checkpoints store experts.<e>.w1/w2/w3; transformers 5 may store experts.gate_up_proj/down_proj."""
    from transformers import AutoConfig

    from pagellm.models.loader import load_weights
    from pagellm.models.moe import MixtralForCausalLM

    path = tiny_models["mixtral"]
    cfg = AutoConfig.from_pretrained(path)
    per_expert = _hf_state(path)
    stacked = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        e = range(cfg.num_local_experts)
        stacked[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[f"{p}.{i}.w1.weight"], per_expert[f"{p}.{i}.w3.weight"]]) for i in e])
        stacked[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [per_expert[f"{p}.{i}.w2.weight"] for i in e])
    a, b = MixtralForCausalLM(cfg, 64), MixtralForCausalLM(cfg, 64)
    load_weights(a, per_expert.items())
    load_weights(b, stacked.items())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_a_missing_expert_is_named(tiny_models):
    from transformers import AutoConfig

    from pagellm.models.loader import load_weights
    from pagellm.models.moe import MixtralForCausalLM

    path = tiny_models["mixtral"]
    state = {k: v for k, v in _hf_state(path).items() if "experts.3.w3" not in k}
    with pytest.raises(ValueError, match=r"missing weights: \['model.layers.0.mlp.experts.w13'"):
        load_weights(MixtralForCausalLM(AutoConfig.from_pretrained(path), 64), state.items())


def test_chat_uses_the_family_template_and_end_of_turn_token(tmp_path, tiny_models):
    """A checkpoint's own template (chat_template.jinja, as transformers 5 saves it) renders the prompt, and
    the end-of-turn token listed in generation_config.json (Llama 3 / Phi-3 style) ends the reply."""
    import json
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "qwen2-chat"
    shutil.copytree(tiny_models["qwen2"], d)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (d / "chat_template.jinja").write_text(template)
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == template
    end_of_turn = tok.convert_tokens_to_ids("<|end|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, end_of_turn]}))
    llm = LLM(str(d), num_gpu_blocks_override=64)
    messages = [{"role": "user", "content": "Good morrow"}]
    ids = llm.apply_chat_template(messages)
    assert tok.decode(ids) == "<|user|>\nGood morrow<|end|>\n<|assistant|>\n"
    out = llm.chat(messages, SamplingParams(max_tokens=8, logit_bias={end_of_turn: 100.0}), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [end_of_turn] and out.outputs[0].finish_reason == "stop"
