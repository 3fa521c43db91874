"""Throughput on prompts with images: pagellm against transformers' LLaVA on the same requests, median over rounds.

    pagellm bench images [--model LLAVA_DIR] [--num-prompts 32] [--min-len 16] [--max-len 64] [--output-len 64]
        [--hf-batch-size 16] [--rounds 3] [--device cpu|cuda]

Without --model, a LLaVA checkpoint is built once (in the system temp directory) from the demo model's shape and
tokenizer (plus an "<image>" token), with random weights and a CLIP vision tower of 4 layers, hidden 256, on
224x224 images in 32x32 patches (49 image positions per image). Each request is one image (random pixels, its
own) and a text of --min-len to --max-len random tokens around it; each generates --output-len tokens (greedy,
EOS ignored). transformers runs static batches of --hf-batch-size (left-padded, the batch's pixel values
stacked) through LlavaForConditionalGeneration.generate; pagellm runs all requests through LLM.generate. Printed:
output tokens/s of each (medians of --rounds, run alternately, new images each round), the ratio, and how many
requests gave the same tokens in both.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

from pagellm.benchmarks.common import median_times, write_report


def build_demo_llava(out: str) -> str:
    """The demo model's shape and tokenizer as a LLaVA checkpoint with random weights (built once)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from pagellm.entrypoints.cli import DEMO_MODEL

    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = AutoConfig.from_pretrained(DEMO_MODEL)
    text.vocab_size = len(tok)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      architectures=["LlavaForConditionalGeneration"])
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def _hf_generate(model, processor, batch: list[tuple[list[int], object]], new: int) -> list[list[int]]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (p, _) in enumerate(batch):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    pixels = processor(images=[img for _, img in batch], return_tensors="pt")["pixel_values"]
    dev = model.device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             pixel_values=pixels.to(dev, model.dtype), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return [row[width:].tolist() for row in out.cpu()]


def main(ns: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from pagellm import LLM, SamplingParams

    path = ns.model or build_demo_llava(os.path.join(tempfile.gettempdir(), "pagellm-bench-llava"))
    llm = LLM(path, dtype=ns.dtype, device=ns.device, max_num_seqs=ns.num_prompts)
    mm = llm.llm_engine.config.model.multimodal
    if mm is None or mm.image_tokens is None:
        raise SystemExit("pagellm bench images runs LLaVA checkpoints (a fixed number of positions per image).")
    dtype = getattr(torch, llm.llm_engine.config.model.dtype)
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(ns.device).eval()
    hf.generation_config.eos_token_id = None  # every request runs to its length
    processor = AutoImageProcessor.from_pretrained(path)
    vocab = llm.llm_engine.config.model.vocab_size
    tok = llm.get_tokenizer()
    special = set(tok.all_special_ids) | {mm.placeholder_id}
    ids = [i for i in range(vocab) if i not in special]

    def make_requests(seed: int) -> list[tuple[list[int], object]]:
        rng = random.Random(seed)
        nrng = np.random.default_rng(seed)
        reqs = []
        for _ in range(ns.num_prompts):
            n = rng.randint(ns.min_len, ns.max_len)
            cut = rng.randint(0, n)
            text = [rng.choice(ids) for _ in range(n)]
            prompt = text[:cut] + [mm.placeholder_id] * mm.image_tokens + text[cut:]  # expanded, as HF takes it
            reqs.append((prompt, Image.fromarray(nrng.integers(0, 256, (240, 320, 3), dtype=np.uint8))))
        return reqs

    sp = SamplingParams(max_tokens=ns.output_len, temperature=0.0, ignore_eos=True)

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
    print(f"{ns.num_prompts} requests: one image ({mm.image_tokens} positions) + {ns.min_len}-{ns.max_len} text "
          f"tokens, {ns.output_len} output tokens each; {llm.llm_engine.config.model.dtype} on {ns.device}; medians "
          f"of {ns.rounds} rounds")
    for name, t in med.items():
        print(f"  {name:40s} {out_tokens / t:9.1f} output tok/s  {first / t:5.2f}x")
    speedup = med[list(med)[1]] / first
    print(f"  pagellm / transformers: {speedup:.2f}x; {same}/{len(a)} requests gave the same tokens in both")
    report = {"model": path, "num_prompts": ns.num_prompts, "image_tokens": mm.image_tokens,
              "output_len": ns.output_len, "rounds": ns.rounds, "seconds": med, "speedup": speedup,
              "same_tokens": same}
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="A LLaVA checkpoint directory (default: built from the demo "
                                                 "model's shape, random weights).")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", default=None)
