"""Throughput on prompts with images: pagellm against transformers on the same requests, median over rounds.

    pagellm bench images [--model DIR | --family llava|qwen2-vl|gemma3] [--num-prompts 32] [--min-len 16] [--max-len 64]
        [--output-len 64] [--hf-batch-size 16] [--rounds 3] [--device cpu|cuda]

Without --model, a checkpoint of --family is built once (in the system temp directory) from the demo model's shape
and tokenizer (plus the family's image tokens), with random weights: llava, a CLIP tower of 4 layers, hidden 256,
on 224x224 images in 32x32 patches (49 positions per image); qwen2-vl, a 4-block vision transformer on 14x14
patches merged 2x2, images resized to 112-224 pixels a side (16 to 64 positions, by their shape), multimodal RoPE;
gemma3, a 4-layer SigLIP tower on 224x224 images in 14x14 patches pooled 4x4 (16 positions per image, attending to
each other both ways) and Gemma 3's decoder in the demo model's shape (sliding and global layers).
Each request is one image (random pixels, its own; 240x320) and a text of --min-len to --max-len random tokens
around it; each generates --output-len tokens (greedy, EOS ignored). transformers runs static batches of
--hf-batch-size (left-padded, the batch's images through the checkpoint's processor) through the model's generate;
pagellm runs all requests through LLM.generate. Printed: output tokens/s of each (medians of --rounds, run
alternately, new images each round), the ratio, and how many requests gave the same tokens in both.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

from pagellm.benchmarks.common import median_times, write_report


def build_demo(family: str, out: str) -> str:
    """The demo model's shape and tokenizer as a vision-language checkpoint with random weights (built once)."""
    import torch
    import transformers as tf

    from pagellm.entrypoints.cli import DEMO_MODEL

    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    tok = tf.AutoTokenizer.from_pretrained(DEMO_MODEL)
    demo = tf.AutoConfig.from_pretrained(DEMO_MODEL)
    torch.manual_seed(0)
    if family == "llava":
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        demo.vocab_size = len(tok)
        vision = tf.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=4, image_size=224, patch_size=32)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=demo,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", architectures=["LlavaForConditionalGeneration"])
        tf.LlavaForConditionalGeneration(cfg).save_pretrained(out)
        tf.CLIPImageProcessor(size={"shortest_edge": 224},
                              crop_size={"height": 224, "width": 224}).save_pretrained(out)
    elif family == "gemma3":
        names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tok.add_special_tokens({"additional_special_tokens": list(names.values())})
        tok.save_pretrained(out)  # reloaded with Gemma 3's named tokens, which its processor reads
        tok = tf.AutoTokenizer.from_pretrained(out, extra_special_tokens=names)
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
        text = tf.Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=demo.hidden_size, intermediate_size=demo.intermediate_size,
            num_hidden_layers=demo.num_hidden_layers, num_attention_heads=demo.num_attention_heads,
            num_key_value_heads=demo.num_key_value_heads, head_dim=demo.head_dim,
            query_pre_attn_scalar=demo.head_dim, max_position_embeddings=demo.max_position_embeddings,
            sliding_window=64, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
        vision = tf.SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=224, patch_size=14, vision_use_head=False)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                              boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                              image_token_index=ids["image_token"], architectures=["Gemma3ForConditionalGeneration"])
        tf.Gemma3ForConditionalGeneration(cfg).save_pretrained(out)
        tf.Gemma3ImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    else:
        names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tok.add_special_tokens({"additional_special_tokens": names})
        ids = {n: tok.convert_tokens_to_ids(n) for n in names}
        text = {k: getattr(demo, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
        half = demo.head_dim // 2
        text.update(vocab_size=len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [half - 2 * (3 * half // 8),
                                                                            3 * half // 8, 3 * half // 8]})
        vision = dict(depth=4, embed_dim=256, hidden_size=demo.hidden_size, num_heads=4, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
                               architectures=["Qwen2VLForConditionalGeneration"])
        tf.Qwen2VLForConditionalGeneration(cfg).save_pretrained(out)
        tf.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=112 * 112,
                                 max_pixels=224 * 224).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _hf_generate(model, processor, batch: list[tuple[list[int], object]], new: int) -> list[list[int]]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (p, _) in enumerate(batch):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    x = processor(images=[img for _, img in batch], return_tensors="pt")
    dev = model.device
    kw = {"pixel_values": x["pixel_values"].to(dev, model.dtype)}
    if "image_grid_thw" in x:  # Qwen2-VL: the grids, and where the image positions are (multimodal RoPE)
        kw["image_grid_thw"] = x["image_grid_thw"].to(dev)
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int().to(dev)
    if "image_sizes" in x:  # LLaVA-NeXT: each image's size, for its tile grid
        kw["image_sizes"] = x["image_sizes"].to(dev)
    if model.config.model_type == "gemma3":  # as its processor marks them: image positions attend both ways
        kw["token_type_ids"] = (ids == model.config.image_token_index).long().to(dev)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, **kw)
    return [row[width:].tolist() for row in out.cpu()]


def main(ns: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from pagellm import LLM, SamplingParams

    path = ns.model or build_demo(ns.family, os.path.join(tempfile.gettempdir(), f"pagellm-bench-{ns.family}"))
    llm = LLM(path, dtype=ns.dtype, device=ns.device, max_num_seqs=ns.num_prompts)
    mm = llm.llm_engine.config.model.multimodal
    if mm is None:
        raise SystemExit(f"{path} is not a multimodal checkpoint.")
    dtype = getattr(torch, llm.llm_engine.config.model.dtype)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(ns.device).eval()
    hf.generation_config.eos_token_id = None  # every request runs to its length
    kw = {}
    if hf.config.model_type == "mistral3":  # as PixtralProcessor asks for it: patches of the merged size
        side = hf.config.vision_config.patch_size * hf.config.spatial_merge_size
        kw["patch_size"] = {"height": side, "width": side}
    processor = AutoImageProcessor.from_pretrained(path, **kw)
    vocab = llm.llm_engine.config.model.vocab_size
    tok = llm.get_tokenizer()
    special = set(tok.all_special_ids) | {mm.placeholder_id}
    ids = [i for i in range(vocab) if i not in special]
    sp = SamplingParams(max_tokens=ns.output_len, temperature=0.0, ignore_eos=True)
    image_ph = tok.encode(mm_text(tok, mm.placeholder_id), add_special_tokens=False)

    sizes: list[int] = []  # positions each request's image fills

    def make_requests(seed: int) -> list[tuple[list[int], object]]:
        rng = random.Random(seed)
        nrng = np.random.default_rng(seed)
        reqs = []
        for _ in range(ns.num_prompts):
            n = rng.randint(ns.min_len, ns.max_len)
            cut = rng.randint(0, n)
            text = [rng.choice(ids) for _ in range(n)]
            img = Image.fromarray(nrng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
            expanded = llm.llm_engine.input_processor.process(  # as HF takes it
                {"prompt_token_ids": text[:cut] + image_ph + text[cut:], "multi_modal_data": {"image": img}}, sp)
            reqs.append((expanded.prompt_token_ids, img))
            sizes.append(sum(f.length for f in expanded.mm_features))
        return reqs

    def run_pagellm(reqs):
        outs = llm.generate([{"prompt_token_ids": p, "multi_modal_data": {"image": img}} for p, img in reqs], sp,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def run_hf(reqs):
        out = []
        for s in range(0, len(reqs), ns.hf_batch_size):
            out += _hf_generate(hf, processor, reqs[s:s + ns.hf_batch_size], ns.output_len)
        return out

    runs = {"pagellm": run_pagellm, f"transformers (static batches of {ns.hf_batch_size})": run_hf}
    warm = make_requests(ns.rounds)
    a, b = (fn(warm) for fn in runs.values())  # warm-up, and the agreement below
    same = sum(x == y for x, y in zip(a, b))
    med = median_times(runs, [make_requests(r) for r in range(ns.rounds)], ns.device)
    out_tokens = ns.num_prompts * ns.output_len
    first = med["pagellm"]
    positions = sum(sizes) / len(sizes)
    print(f"{ns.num_prompts} requests: one image ({positions:.0f} positions) + {ns.min_len}-{ns.max_len} text "
          f"tokens, {ns.output_len} output tokens each; {llm.llm_engine.config.model.dtype} on {ns.device}; medians "
          f"of {ns.rounds} rounds")
    for name, t in med.items():
        print(f"  {name:40s} {out_tokens / t:9.1f} output tok/s  {first / t:5.2f}x")
    speedup = med[list(med)[1]] / first
    print(f"  pagellm / transformers: {speedup:.2f}x; {same}/{len(a)} requests gave the same tokens in both")
    report = {"model": path, "num_prompts": ns.num_prompts, "image_tokens": positions,
              "output_len": ns.output_len, "rounds": ns.rounds, "seconds": med, "speedup": speedup,
              "same_tokens": same}
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="A vision-language checkpoint directory (default: one of --family "
                                                 "built from the demo model's shape, random weights).")
    p.add_argument("--family", default="llava", choices=["llava", "qwen2-vl", "gemma3"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", default=None)


def mm_text(tok, placeholder_id: int) -> str:
    """How a prompt names one image: the placeholder, inside the vision markers where the model has them."""
    ph = tok.convert_ids_to_tokens(placeholder_id)
    return f"<|vision_start|>{ph}<|vision_end|>" if ph == "<|image_pad|>" else ph
