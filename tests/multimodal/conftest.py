"""transformers' models (LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration, ...) as the reference for the
vision-language checkpoints (`vlm_models`, in tests/conftest.py)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _hf(path: str):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    return model


@torch.inference_mode()
def hf_vlm_greedy(path: str, prompt_ids: list[int], images: list, max_new_tokens: int,
                  processor_kwargs: dict | None = None):
    """Greedy tokens of transformers' model for an expanded prompt and its images (through the checkpoint's image
    processor built with `processor_kwargs`), and the logprob of each."""
    from transformers import AutoImageProcessor

    model = _hf(path)
    processor_kwargs = dict(processor_kwargs or {})
    if model.config.model_type == "mistral3":  # as PixtralProcessor asks for it: patches of the merged size
        side = model.config.vision_config.patch_size * model.config.spatial_merge_size
        processor_kwargs.setdefault("patch_size", {"height": side, "width": side})
    processor = AutoImageProcessor.from_pretrained(path, **processor_kwargs)
    ids = torch.tensor([prompt_ids])
    kw = {}
    if images:
        x = processor(images=images, return_tensors="pt")
        kw["pixel_values"] = x["pixel_values"]
        if "image_sizes" in x:  # LLaVA-NeXT: each image's size, for its tile grid
            kw["image_sizes"] = x["image_sizes"]
        if "image_grid_thw" in x:  # Qwen2-VL: the grids, and which tokens are image positions (for M-RoPE)
            kw["image_grid_thw"] = x["image_grid_thw"]
            kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        if "image_position_ids" in x:  # Gemma 4: each patch's (x, y); the image positions, for its mask
            kw["image_position_ids"] = x["image_position_ids"]
            kw["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
        if model.config.model_type == "gemma3":  # as its processor marks them: image positions attend both ways
            kw["token_type_ids"] = (ids == model.config.image_token_index).long()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]
