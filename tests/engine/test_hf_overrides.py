"""--hf-overrides (vLLM's flag): values that replace config.json's, the model then built from them, as transformers
builds it from the same overridden config."""

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.hf_reference import hf_greedy, hf_greedy_with


def test_overrides_reach_the_model_as_they_reach_transformers(llama_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    over = {"rope_parameters": {"rope_theta": 50.0}, "max_position_embeddings": 128}
    llm = LLM(llama_path, hf_overrides=over, num_gpu_blocks_override=32)
    cfg = llm.llm_engine.config.model
    assert cfg.max_model_len == 128  # derived from the overridden value
    assert cfg.hf_config.rope_parameters["rope_theta"] == 50.0
    assert cfg.hf_config.rope_parameters["rope_type"] == "default"  # a nested dict is merged, not replaced
    hf_cfg = AutoConfig.from_pretrained(llama_path)
    hf_cfg.rope_parameters = {**hf_cfg.rope_parameters, "rope_theta": 50.0}
    hf = AutoModelForCausalLM.from_pretrained(llama_path, config=hf_cfg, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    prompt = list(range(40, 100))
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy_with(hf, prompt, 12)[0]
    assert got != hf_greedy(llama_path, prompt, 12)[0]  # the override changed the model
    with pytest.raises(ValueError, match="hf_overrides must be a JSON object"):
        LLM(llama_path, hf_overrides=[1])
