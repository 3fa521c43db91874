"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 through pagellm against transformers on the same checkpoints: images
of their own size (positions from the merged patch grid), multimodal RoPE (3-D positions in the image stretch, index +
delta after it; Qwen3-VL's and Qwen3.5's interleaved), Qwen3-VL's deepstack features, Qwen3.5's hybrid decoder
(recurrent states checkpointed under prefix caching), over chunked prefill, prefix-cache hits, preemption, async
scheduling, emulated CUDA graphs and TP=2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagellm import LLM
from tests.multimodal import checks

P = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = checks.prompts_with(P)


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3_5", "qwen3_5_moe"])
def test_greedy_equals_transformers(vlm_models, name):
    checks.greedy_equals_hf(vlm_models[name], PROMPTS)


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3_5"])
def test_tensor_parallel_equals_transformers(vlm_models, name):
    checks.tensor_parallel(vlm_models[name], PROMPTS)


def test_prompt_and_positions_equal_transformers(vlm_models):
    """Each pad becomes grid_t * grid_h * grid_w / merge^2 pads by transformers' image processor (what its
    Qwen2VLProcessor writes), and the 3-D positions equal transformers' get_rope_index."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = vlm_models["qwen2-vl"]
    llm = LLM(path, max_model_len=256)
    ours = llm.llm_engine.input_processor.process(PROMPTS[1], checks.greedy())
    grid = AutoImageProcessor.from_pretrained(path)(images=PROMPTS[1]["multi_modal_data"]["image"],
                                                    return_tensors="pt")["image_grid_thw"]
    sizes = (grid.prod(-1) // 4).tolist()
    assert [f.length for f in ours.mm_features] == sizes
    assert grid[0].tolist() != grid[1].tolist()  # each image its own grid (rows x columns differ)
    tok = AutoTokenizer.from_pretrained(path)
    text = PROMPTS[1]["prompt"].replace("<|image_pad|>", "\0")
    for n in sizes:
        text = text.replace("\0", "<|image_pad|>" * n, 1)
    assert ours.prompt_token_ids == tok.encode(text)
    hf = AutoModelForImageTextToText.from_pretrained(path)
    ids = torch.tensor([ours.prompt_token_ids])
    ref, delta = hf.model.get_rope_index(ids, (ids == hf.config.image_token_id).int(), grid)
    a, b, table, d = ours.mm_rope
    n = len(ours.prompt_token_ids)
    mine = np.repeat(np.arange(n)[None], 3, 0)
    mine[:, a:b] = table
    mine[:, b:] += d
    assert (mine == ref[:, 0].numpy()).all() and d == int(delta) and d < 0


@pytest.mark.parametrize("name, async_scheduling", [("qwen2-vl", False), ("qwen2-vl", True), ("qwen3-vl", False),
                                                    ("qwen3_5", False), ("qwen3_5_moe", True)])
def test_chunks_prefix_hits_and_preemption(vlm_models, name, async_scheduling):
    """qwen3-vl: images cut by prefill chunks of 8 take their deepstack features row by row. qwen3_5: the recurrent
    states carry over chunks that cut an image, and are checkpointed every 4 tokens (in slots enough for them all) for
    the prefix hits."""
    kw = {"mamba_block_size": 4, "num_state_checkpoints": 32} if name.startswith("qwen3_5") else {}
    checks.chunks_prefix_hits_and_preemption(vlm_models[name], PROMPTS, chunk=8, blocks=20,
                                            async_scheduling=async_scheduling, **kw)


def test_hybrid_state_checkpoints_are_keyed_by_the_image(vlm_models):
    """Qwen3.5 under prefix caching: a prompt whose text equals an earlier one's but whose image differs restores
    the recurrent state of the text before its image only (a checkpoint past the image would hold the other image's
    state); the first prompt again restores past its image. Every output is transformers'."""
    path = vlm_models["qwen3_5"]
    llm = LLM(path, max_model_len=256, block_size=4, mamba_block_size=4)
    first = llm.generate(PROMPTS[0], checks.greedy(), use_tqdm=False)[0]
    other = llm.generate(PROMPTS[2], checks.greedy(), use_tqdm=False)[0]
    again = llm.generate(PROMPTS[0], checks.greedy(), use_tqdm=False)[0]
    image_at = first.prompt_token_ids.index(llm.llm_engine.config.model.multimodal.placeholder_id)
    assert first.prompt_token_ids == other.prompt_token_ids  # the same tokens: only the image tells them apart
    assert 0 < other.num_cached_tokens <= image_at < again.num_cached_tokens
    checks.against_hf(path, [PROMPTS[0], PROMPTS[2], PROMPTS[0]], [first, other, again])
    assert other.outputs[0].token_ids != first.outputs[0].token_ids == again.outputs[0].token_ids


def test_emulated_cuda_graphs_decode_with_the_rope_offset(vlm_models, monkeypatch):
    """Decode steps replay graphs with 1-D positions index + delta; prompt steps with images run eagerly with
    3-D positions."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    checks.emulated_graphs(vlm_models["qwen2-vl"], PROMPTS)


def test_chat_and_refusals(vlm_models):
    _, text = checks.chat_with_an_image(vlm_models["qwen2-vl"])
    assert text.startswith("<|user|><|vision_start|><|image_pad|>") and "<|vision_end|>hi<|end|>" in text
    with pytest.raises(ValueError, match="num_scheduler_steps must be 1"):
        LLM(vlm_models["qwen2-vl"], num_scheduler_steps=4)


def test_mrope_rotary_equals_transformers():
    """The rotary part alone: 3-D positions turn each frequency section by its own row, as transformers does."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    from pagellm.models.layers import MRotaryEmbedding

    cfg = Qwen2VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})).text_config
    pos = torch.tensor([[0, 1, 2, 2, 2, 5], [0, 1, 2, 3, 3, 5], [0, 1, 2, 2, 3, 5]])
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    mq, mk = MRotaryEmbedding(cfg, 32, [2, 3, 3])(pos, q, k)
    cos, sin = Qwen2VLRotaryEmbedding(cfg)(q, pos[:, None, :])
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.allclose(mq, rq[0].transpose(0, 1), atol=1e-5) and torch.allclose(mk, rk[0].transpose(0, 1), atol=1e-5)


def test_interleaved_mrope_rotary_equals_transformers():
    """Qwen3-VL: the frequencies turned by the temporal, height and width rows in turn (T H W T H W T H)."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

    from pagellm.models.layers import MRotaryEmbedding

    cfg = Qwen3VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    ).text_config
    pos = torch.tensor([[0, 1, 2, 2, 2, 5], [0, 1, 2, 3, 3, 5], [0, 1, 2, 2, 3, 5]])
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    mq, mk = MRotaryEmbedding(cfg, 32, [2, 3, 3], interleaved=True)(pos, q, k)
    cos, sin = Qwen3VLTextRotaryEmbedding(cfg)(q, pos[:, None, :])
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.allclose(mq, rq[0].transpose(0, 1), atol=1e-5) and torch.allclose(mk, rk[0].transpose(0, 1), atol=1e-5)
    sectioned, _ = MRotaryEmbedding(cfg, 32, [2, 3, 3])(pos, q, k)
    assert not torch.allclose(mq, sectioned, atol=1e-3)  # the layouts differ where the rows differ


def test_mm_processor_kwargs(vlm_models):
    """--mm-processor-kwargs (engine) and a request's mm_processor_kwargs reach the image processor: max_pixels
    bounds the positions an image fills, as transformers' processor built with it does."""
    from PIL import Image
    from transformers import AutoImageProcessor

    path = vlm_models["qwen2-vl"]
    big = {"max_pixels": 112 * 112}  # the checkpoint's own bound is 56 x 56
    photo = Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    prompts = [{**PROMPTS[0], "multi_modal_data": {"image": photo}}, *PROMPTS[1:]]
    llm = LLM(path, max_model_len=256, mm_processor_kwargs=big)
    outs = llm.generate(prompts, checks.greedy(), use_tqdm=False)
    checks.against_hf(path, prompts, outs, big)
    grid = AutoImageProcessor.from_pretrained(path, **big)(images=[photo], return_tensors="pt")["image_grid_thw"]
    plain = LLM(path, max_model_len=256)
    n_big = outs[0].prompt_token_ids.count(llm.llm_engine.config.model.multimodal.placeholder_id)
    assert n_big == int(grid.prod()) // 4
    default = plain.generate(prompts[:1], checks.greedy(), use_tqdm=False)[0]
    assert len(default.prompt_token_ids) < len(outs[0].prompt_token_ids)
    per_request = plain.generate([{**prompts[0], "mm_processor_kwargs": big}], checks.greedy(), use_tqdm=False)[0]
    assert per_request.prompt_token_ids == outs[0].prompt_token_ids
    assert per_request.outputs[0].token_ids == outs[0].outputs[0].token_ids
    chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": photo}]}]
    assert len(plain.chat(chat, checks.greedy(), use_tqdm=False, mm_processor_kwargs=big)[0].prompt_token_ids) > \
        len(plain.chat(chat, checks.greedy(), use_tqdm=False)[0].prompt_token_ids)
    with pytest.raises(ValueError, match="mm_processor_kwargs") as e:
        plain.generate([{**PROMPTS[0], "mm_processor_kwargs": {"no_such_setting": 1}}], checks.greedy(), use_tqdm=False)
    assert e.value.param == "mm_processor_kwargs"
    with pytest.raises(ValueError, match="mm_processor_kwargs applies to multimodal models"):
        LLM(vlm_models["llava"].replace("multimodal/llava", "llama"), mm_processor_kwargs=big)
