"""Models the transformers fallback cannot run correctly are refused with the reason, never run with wrong output:
layers that are not attention (Mamba hybrids), tokens that meet outside attention (found by the probe after
loading), attention sinks (GPT-OSS), chunked attention (Llama 4) and keys reshaped inside the layer (JetMoE). Each
would otherwise give other tokens than transformers (or fail mid-step): the flat batch runs a state-space layer
across sequences and without its state, the fallback passes neither sinks nor chunks to the paged kernels (GPT-OSS
and Llama 4 run natively instead), and a cache sized from the config cannot hold keys of another shape."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
             tie_word_embeddings=False)


def tiny_checkpoint(directory, model_type: str) -> str:
    from make_models import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    base = AutoConfig.for_model(model_type)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **{k: v for k, v in SMALL.items() if hasattr(base, k)})
    torch.manual_seed(0)
    path = str(directory / model_type)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type, reason", [
    # Falcon-H1 (native, but not on the fallback): attention and Mamba side by side in every layer, declared in
    # layer_types: refused before loading
    ("falcon_h1", r"its layers are not all attention layers \(hybrid in config.layer_types\)"),
    # Jamba (Mamba layers between attention ones, no layer_types) and Qwen3-Next (linear attention, "linear_attention"
    # in layer_types), both native but not on the fallback: the probe finds their tokens meeting outside attention
    ("jamba", "its tokens meet outside attention"),
    ("qwen3_next", "its tokens meet outside attention"),
    # GPT-OSS and Llama 4 run natively; on the fallback (model_impl="transformers") their sinks and chunks would be
    # dropped
    ("gpt_oss", r"attention sinks \(s_aux\)"),
    ("llama4_text", r"chunked local attention \(attention_chunk_size\)"),
    # JetMoE: its K/V heads tiled top_k times inside the layer, after its cache update: refused by the probe
    ("jetmoe", r"passes keys of 4 heads x 16 where the config gives 2 K/V heads x 16"),
])
def test_models_the_fallback_would_run_wrongly_are_refused_with_the_reason(tmp_path, model_type, reason):
    path = tiny_checkpoint(tmp_path, model_type)
    with pytest.raises(ValueError, match=f"transformers fallback.*{reason}|{reason}"):
        native = model_type in ("gpt_oss", "llama4_text", "qwen3_next", "falcon_h1", "jamba")
        LLM(path, num_gpu_blocks_override=16, model_impl="transformers" if native else "auto")


def test_model_impl_picks_the_implementation(tiny_models):
    """vLLM's --model-impl: transformers runs a natively supported model on the fallback (same tokens as
    transformers), pagellm refuses a model without a native implementation."""
    from pagellm import SamplingParams
    from tests.hf_reference import hf_greedy

    path = tiny_models["qwen3"]
    llm = LLM(path, num_gpu_blocks_override=32, model_impl="transformers")
    assert llm.llm_engine.config.model.architecture == "TransformersForCausalLM"
    prompt = [5, 17, 99, 230, 41, 8]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(path, prompt, 10)[0]
    with pytest.raises(ValueError, match="model_impl='pagellm', but model architecture .*StableLmForCausalLM.* has "
                                         "no native implementation"):
        LLM(tiny_models["stablelm"], model_impl="pagellm")
    with pytest.raises(ValueError, match="model_impl must be auto, pagellm or transformers"):
        LLM(path, model_impl="vllm")
