"""LLaVA through pagellm against transformers' LlavaForConditionalGeneration on the same checkpoint: greedy tokens
equal and logprobs close, for batches mixing prompts with several images, text-only ones, chunked prefill that
splits an image, prefix-cache hits, preemption and tensor parallelism; the prompt pagellm builds equals
LlavaProcessor's; bad multimodal input fails alone with a ValueError naming the field."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.multimodal.checks import (
    IMGS,
    N,
    against_hf,
    emulated_graphs,
    greedy,
    greedy_equals_hf,
    images_of,
    prompts_with,
    tensor_parallel,
)

PROMPTS = prompts_with("<image>")


@pytest.mark.parametrize("name", ["llava", "llava-full", "llava-siglip"])
def test_greedy_equals_transformers(vlm_models, name):
    greedy_equals_hf(vlm_models[name], PROMPTS)


def test_prompt_equals_llava_processor(vlm_models):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    path = vlm_models["llava"]
    proc = LlavaProcessor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                          patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    llm = LLM(path, max_model_len=256)
    ours = llm.llm_engine.input_processor.process(PROMPTS[1], greedy())
    theirs = proc(text=PROMPTS[1]["prompt"], images=images_of(PROMPTS[1]), return_tensors="pt")
    assert ours.prompt_token_ids == theirs["input_ids"][0].tolist()
    image_id = llm.llm_engine.config.model.multimodal.placeholder_id
    at = [i for i, t in enumerate(ours.prompt_token_ids) if t == image_id]
    assert [p for f in ours.mm_features for p in range(f.offset, f.end)] == at and len(at) == 32
    # a prompt that arrives expanded (as LlavaProcessor writes it) is taken as is
    again = llm.llm_engine.input_processor.process(
        {"prompt_token_ids": ours.prompt_token_ids, "multi_modal_data": PROMPTS[1]["multi_modal_data"]}, greedy())
    assert again.prompt_token_ids == ours.prompt_token_ids
    assert [f.identifier for f in again.mm_features] == [f.identifier for f in ours.mm_features]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_prefill_encodes_a_split_image_once(vlm_models, async_scheduling):
    path = vlm_models["llava"]
    llm = LLM(path, max_model_len=256, max_num_batched_tokens=8, max_num_seqs=2, async_scheduling=async_scheduling)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    against_hf(path, PROMPTS, outs)
    assert llm.llm_engine.executor.runner.mm.num_encoded == 4  # 16 positions per image over 8-token chunks
    assert not llm.llm_engine.executor.runner.mm.cache


def test_emulated_cuda_graphs(vlm_models, monkeypatch):
    """The GPU path (staged inputs, decode steps replayed as graphs, async scheduling): prompt steps with images
    run eagerly with their features, decode steps replay, a prefix hit that leaves one image position to compute
    does not replay."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    path = vlm_models["llava"]
    llm = emulated_graphs(path, PROMPTS, block_size=4)
    ends_in_image = {"prompt": "The quick brown fox<image>", "multi_modal_data": {"image": IMGS[0]}}
    first = llm.generate([ends_in_image], greedy(), use_tqdm=False)[0]
    again = llm.generate([ends_in_image], greedy(), use_tqdm=False)[0]
    assert again.num_cached_tokens == len(first.prompt_token_ids) - 1  # only the image's last position is computed
    against_hf(path, [ends_in_image] * 2, [first, again])


def test_prefix_cache_tells_images_apart(vlm_models):
    path = vlm_models["llava"]
    llm = LLM(path, max_model_len=256, block_size=4)
    a, b = ({"prompt": "The quick brown fox jumps <image> over the dog", "multi_modal_data": {"image": img}}
            for img in (IMGS[0], IMGS[3]))
    offset = llm.llm_engine.input_processor.process(a, greedy()).mm_features[0].offset
    assert offset >= 4
    first = llm.generate([a], greedy(), use_tqdm=False)[0]
    other = llm.generate([b], greedy(), use_tqdm=False)[0]  # same text, another image
    against_hf(path, [a, b], [first, other])
    assert other.num_cached_tokens == offset // 4 * 4  # the blocks before the image only
    same = llm.generate([a], greedy(), use_tqdm=False)[0]
    n = len(first.prompt_token_ids)
    assert same.num_cached_tokens == (n - 1) // 4 * 4
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    # a hit that ends inside the image: the worker encodes it again for the positions left
    llm2 = LLM(path, max_model_len=256, block_size=4)
    llm2.generate([{"prompt": "The quick brown fox jumps <image>", "multi_modal_data": {"image": IMGS[0]}}],
                  greedy(), use_tqdm=False)
    again = llm2.generate([a], greedy(), use_tqdm=False)[0]
    assert offset < again.num_cached_tokens < offset + 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_preemption_recomputes_images(vlm_models):
    path = vlm_models["llava"]
    prompts = PROMPTS * 2
    llm = LLM(path, max_model_len=256, block_size=4, num_gpu_blocks_override=24, enable_prefix_caching=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    ref = LLM(path, max_model_len=256).generate(prompts, SamplingParams(max_tokens=30, temperature=0.0,
                                                                        ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks
    assert not llm.llm_engine.executor.runner.mm.pending


@torch.inference_mode()
def test_parallel_samples_and_beams_with_images(vlm_models):
    llm = LLM(vlm_models["llava"], max_model_len=256)
    n2 = llm.generate([PROMPTS[1]], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=7), use_tqdm=False)[0]
    alone = [llm.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i),
                          use_tqdm=False)[0].outputs[0].token_ids for i in range(2)]
    assert [c.token_ids for c in sorted(n2.outputs, key=lambda c: c.index)] == alone
    from transformers import AutoImageProcessor

    from pagellm import BeamSearchParams
    from tests.multimodal.conftest import _hf

    beams = llm.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=3, max_tokens=12), use_tqdm=False)[0]
    prompt = llm.llm_engine.input_processor.process(PROMPTS[0], greedy()).prompt_token_ids
    ids = torch.tensor([prompt])
    pixels = AutoImageProcessor.from_pretrained(vlm_models["llava"])(images=[IMGS[0]], return_tensors="pt")
    eos = sorted(llm.llm_engine.config.model.eos_token_ids)
    ref = _hf(vlm_models["llava"]).generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3,
                                            num_return_sequences=3, do_sample=False, max_new_tokens=12,
                                            pixel_values=pixels["pixel_values"], eos_token_id=eos, pad_token_id=0)
    hf_beams = []
    for row in ref.tolist():  # transformers' beams, cut after their EOS (padding follows it)
        gen = row[len(prompt):]
        cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
        hf_beams.append(gen[:cut])
    assert [b.tokens[len(prompt):] for b in beams.sequences] == hf_beams  # transformers' num_beams, with the image
    assert all(b.tokens[:len(prompt)] == prompt for b in beams.sequences)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_tensor_parallel_equals_transformers(vlm_models):
    tensor_parallel(vlm_models["llava"], PROMPTS)


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_images(vlm_models, tmp_path):
    path = vlm_models["llava"]
    llm = LLM(path, max_model_len=256, allowed_local_media_path=str(tmp_path))
    IMGS[1].save(tmp_path / "cat.png")
    parts = [{"type": "text", "text": "To be"}, {"type": "image_url", "image_url": {"url": _data_url(IMGS[1])}},
             {"type": "text", "text": " or not"}]
    by_url = llm.chat([{"role": "user", "content": parts}], greedy(), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert tok.decode(by_url.prompt_token_ids).startswith("<|user|>To be" + "<image>" * 16 + " or not<|end|>")
    against_hf(path, [{"multi_modal_data": {"image": IMGS[1]}}], [by_url])
    pil = [{**parts[1], "type": "image_pil", "image_pil": IMGS[1]} if p["type"] == "image_url" else p for p in parts]
    by_pil = llm.chat([{"role": "user", "content": pil}], greedy(), use_tqdm=False)[0]
    local = [{**p, "image_url": {"url": f"file://{tmp_path}/cat.png"}} if p["type"] == "image_url" else p
             for p in parts]
    by_file = llm.chat([{"role": "user", "content": local}], greedy(), use_tqdm=False)[0]
    assert by_pil.outputs[0].token_ids == by_file.outputs[0].token_ids == by_url.outputs[0].token_ids
    # a template that reads content as a string gets the placeholder before the message's text (vLLM's rule)
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = llm.chat([{"role": "user", "content": parts}], greedy(), chat_template=plain, use_tqdm=False)[0]
    assert tok.decode(out.prompt_token_ids) == "<image>" * 16 + "\nTo be or not"


def test_bad_multimodal_input_fails_alone(vlm_models, tiny_models, tmp_path):
    path = vlm_models["llava"]
    llm = LLM(path, max_model_len=256, limit_mm_per_prompt={"image": 2})
    cases = [
        ({"prompt": "no placeholder", "multi_modal_data": {"image": IMGS[0]}}, "1 image"),
        ({"prompt": "<image><image>", "multi_modal_data": {"image": IMGS[0]}}, "2 image placeholder"),
        ({"prompt": "an <image> only"}, "1 image placeholder token"),
        ({"prompt": "<image>" * 3, "multi_modal_data": {"image": IMGS[:3]}}, "at most 2 image"),
        ({"prompt": "<image>", "multi_modal_data": {"image": b"not an image"}}, "not an image pagellm can decode"),
        ({"prompt": "<image>", "multi_modal_data": {"video": IMGS[0]}}, "not \\['video'\\]"),
        ({"prompt": "<image>", "multi_modal_data": {"image": "file:///etc/passwd"}}, "allowed-local-media-path"),
        ({"prompt": "<image>", "multi_modal_data": {"image": "data:image/png;base64,@@"}}, "not valid base64"),
        ({"prompt": "<image>" * 2, "multi_modal_data": {"image": IMGS[:2]}}, None),  # fits
    ]
    for prompt, match in cases:
        if match is None:
            assert llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids
            continue
        with pytest.raises(ValueError, match=match) as e:
            llm.generate([prompt], greedy(), use_tqdm=False)
        assert getattr(e.value, "param", "multi_modal_data") == "multi_modal_data"
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, truncate_prompt_tokens=20), use_tqdm=False)
    too_long = {"prompt": "x " * 200 + "<image>", "multi_modal_data": {"image": IMGS[0]}}
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([too_long], greedy(), use_tqdm=False)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks
    against_hf(path, PROMPTS[:1], llm.generate(PROMPTS[:1], greedy(), use_tqdm=False))  # still serving
    text = LLM(tiny_models["llama"], max_model_len=128)
    with pytest.raises(ValueError, match="takes text only"):
        text.generate([{"prompt": "hi", "multi_modal_data": {"image": IMGS[0]}}], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="takes text only"):
        text.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": IMGS[0]}]}], greedy())
    with pytest.raises(ValueError, match="limit_mm_per_prompt applies to multimodal models"):
        LLM(tiny_models["llama"], limit_mm_per_prompt={"image": 1})
    with pytest.raises(ValueError, match="runner generate"):
        LLM(path, runner="pooling")
    with pytest.raises(ValueError, match="not 'audio'"):
        LLM(path, limit_mm_per_prompt={"audio": 1})


@pytest.mark.parametrize("layout", ["llava-hf", "transformers-5"])
def test_checkpoint_name_layouts(vlm_models, tmp_path, layout):
    """llava-hf checkpoints name the vision tower's weights under vision_model. (and ship the chat template as the
    processor's chat_template.json); transformers 5 puts the language model and the tower under model. and the LM
    head at the top: both load to the same model."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = vlm_models["llava"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    with open(f"{src}/chat_template.jinja") as f:
        template = f.read()
    if layout == "llava-hf":
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    else:
        (tmp_path / "chat_template.jinja").write_text(template)
    state = load_file(f"{src}/model.safetensors")

    def rename(name: str) -> str:
        if layout == "llava-hf":
            return name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if name.startswith("language_model.model."):
            return "model.language_model." + name[len("language_model.model."):]
        if name.startswith("language_model.lm_head."):
            return name[len("language_model."):]
        return "model." + name

    renamed = {rename(k): v for k, v in state.items()}
    assert set(renamed) != set(state)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    llm = LLM(str(tmp_path), max_model_len=256)
    against_hf(src, PROMPTS[:2], llm.generate(PROMPTS[:2], greedy(), use_tqdm=False))
    assert llm.get_tokenizer().chat_template == template
    msg = [{"role": "user", "content": [{"type": "image_pil", "image_pil": IMGS[0]}, {"type": "text", "text": "hi"}]}]
    assert llm.get_tokenizer().decode(llm.chat(msg, greedy(), use_tqdm=False)[0].prompt_token_ids).startswith(
        "<|user|>" + "<image>" * 16 + "hi<|end|>")


def test_quantization_covers_the_language_model(vlm_models):
    """--quantization int8 quantizes the language model's projections; the vision tower and projector keep the
    compute dtype. (Output quality under quantization is `pagellm bench quality`'s business.)"""
    import torch

    llm = LLM(vlm_models["llava"], max_model_len=256, quantization="int8")
    model = llm.llm_engine.executor.runner.model
    q = model.language_model.model.layers[0].self_attn.qkv_proj
    assert q.qweight.dtype == torch.int8 and not hasattr(q, "weight")
    assert all(p.dtype == torch.float32 for p in model.vision_tower.parameters())
    assert len(llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)[1].outputs[0].token_ids) == N
