"""Check the engine on a CUDA GPU against Hugging Face on the same GPU (greedy tokens, logprobs).

    python scripts/check_cuda.py [--enforce-eager] [--no-async-scheduling] [--attention-backend NAME]
                                 [--hf-device cpu] [--num-scheduler-steps K] [--speculative K]
                                 [--draft-model DIR|self] [--lora]
                                 [--pooling] [--images] [MODEL_DIR ...]
        (default: the tiny test checkpoints, built if missing, and the demo model)

Runs pagellm with device="cuda" (the default attention backend there: the Triton kernel; decode
batches through CUDA graphs unless --enforce-eager; the next step scheduled while one runs unless
--no-async-scheduling; K decode steps per scheduling round with --num-scheduler-steps; K n-gram draft tokens
per step with --speculative, whose steps with drafts run eagerly (with --draft-model, a draft model's K drafts
instead: DIR, or `self` for each checked model as its own draft; every step then runs eagerly); every prompt
through a random rank-8 LoRA adapter on all attention and MLP projections with --lora, against transformers with
the adapter merged into its weights;
with --pooling, the checkpoint's decoder as an embedding model (mean and last-token pooling, chunked prompts) and with
a random classification head, plus a tiny BERT embedder and cross-encoder, against transformers' hidden states and
logits; with --images, a tiny LLaVA and a tiny Qwen2-VL with image prompts, chunked and whole) and
transformers on the same checkpoint and prompts; prints per-model agreement and exits non-zero on any mismatch.
`--hf-device cpu` runs the reference on the CPU instead
(to tell a GPU-side difference of transformers from one of pagellm).
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj",
                "c_fc", "qkv_proj", "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
                "fc1", "fc2", "out_proj", "in_proj", "input_linear", "output_linear")


@torch.no_grad()
def random_adapter(hf, out_dir: str, rank: int = 8, alpha: int = 16) -> str:
    """A PEFT-format LoRA adapter with random A and B on the model's projections (no peft needed), merged into
    `hf`'s own weights (W + alpha / rank * B A) so that transformers is the reference."""
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(0)
    tensors, names = {}, set()
    for name, mod in hf.named_modules():
        if name.split(".")[-1] not in LORA_TARGETS or not isinstance(mod, (torch.nn.Linear, Conv1D)):
            continue
        w = mod.weight
        n_in, n_out = (w.shape[1], w.shape[0]) if isinstance(mod, torch.nn.Linear) else (w.shape[0], w.shape[1])
        a = torch.randn(rank, n_in, generator=gen) * 0.05
        b = torch.randn(n_out, rank, generator=gen) * 0.05
        delta = alpha / rank * (b @ a)
        w += (delta if isinstance(mod, torch.nn.Linear) else delta.t()).to(w.dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        names.add(name.split(".")[-1])
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(names)}, f)
    return out_dir


def spec_config(path: str, k: int, draft: str | None) -> dict | None:
    if not k:
        return None
    if draft:
        return {"model": path if draft == "self" else draft, "num_speculative_tokens": k}
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def check(path: str, n_prompts: int = 8, max_tokens: int = 24, enforce_eager: bool = False,
          async_scheduling: bool = True, attention_backend: str = "auto", hf_device: str = "cuda",
          num_scheduler_steps: int = 1, speculative: int = 0, lora: bool = False, draft: str | None = None) -> bool:
    from transformers import AutoModelForCausalLM

    from pagellm import LLM, LoRARequest, SamplingParams

    # eager attention, as in tests/hf_reference.py: SDPA drops Gemma 2's soft-capping in some releases
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    lora_request = None
    if lora:
        lora_request = LoRARequest("check", 1, random_adapter(hf, tempfile.mkdtemp(prefix="pagellm-lora-")))
    llm = LLM(path, device="cuda", num_gpu_blocks_override=512, enforce_eager=enforce_eager, enable_lora=lora,
              async_scheduling=async_scheduling, max_num_seqs=6,  # fewer rows than prompts
              attention_backend=attention_backend, num_scheduler_steps=num_scheduler_steps,
              speculative_config=spec_config(path, speculative, draft))
    vocab = llm.llm_engine.config.model.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(8, vocab) for _ in range(rng.randint(1, 90))] for _ in range(n_prompts)]
    if speculative and not draft:  # prompts that repeat themselves, so that drafts are found and some accepted
        prompts = [p[:12] * 4 for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    elapsed = time.perf_counter() - t
    hf = hf.to(hf_device).eval()
    hf.generation_config.eos_token_id = None
    ok, max_diff = 0, 0.0
    for p, out in zip(prompts, outs):
        ids = torch.tensor([p], device=hf_device)
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                        output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        ref = g.sequences[0, len(p):].tolist()
        c = out.outputs[0]
        ok += ref == c.token_ids
        if ref == c.token_ids:
            lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, ref)]
            max_diff = max(max_diff, max(abs(a - d[t].logprob) for a, d, t in zip(lps, c.logprobs, ref)))
    graphs = llm.llm_engine.executor.runner.graphs
    mode = "eager" if graphs is None else f"CUDA graphs, {sum(graphs.replays.values())} replays"
    overlapped = llm.llm_engine.stats.overlapped_steps
    mode += f", {overlapped} steps overlapped" if async_scheduling else ", one step at a time"
    mode += f", {llm.llm_engine.executor.runner.backend.name} attention"
    if num_scheduler_steps > 1:
        stats = llm.llm_engine.stats
        mode += f", {stats.device_steps} device steps in {stats.num_steps} rounds"
    if lora:
        mode += ", a rank-8 LoRA adapter"
    if speculative:
        st = llm.llm_engine.get_stats()
        mode += f", {st.spec_num_accepted_tokens}/{st.spec_num_draft_tokens} drafts accepted"
    ref_device = torch.cuda.get_device_name() if hf_device == "cuda" else hf_device
    print(f"{os.path.basename(path)} ({mode}): {ok}/{len(prompts)} greedy outputs equal HF on "
          f"{ref_device}, max logprob diff {max_diff:.2e}, pagellm {elapsed:.2f} s", flush=True)
    return ok == len(prompts) and max_diff < 1e-3


@torch.no_grad()
def check_pooling(path: str, hf_device: str = "cuda") -> bool:
    """The decoder of a causal checkpoint as an embedding model (MEAN and LAST pooling, prompts in 32-token chunks)
    and as a 3-class classifier, against transformers on the same device: max abs difference of the normalized
    embeddings and of the class probabilities."""
    from pooling_models import build_classifier, build_embed
    from transformers import AutoModel, AutoModelForSequenceClassification

    from pagellm import LLM

    tmp = tempfile.mkdtemp(prefix="pagellm-pooling-")
    emb_dir = build_embed(path, os.path.join(tmp, "embed"))
    cls_dir = build_classifier(path, os.path.join(tmp, "cls"), 3)
    rng = random.Random(0)
    vocab = AutoModel.from_pretrained(emb_dir).config.vocab_size
    prompts = [[rng.randrange(8, vocab) for _ in range(rng.randint(1, 90))] for _ in range(8)]
    hf = AutoModel.from_pretrained(emb_dir, dtype=torch.float32, attn_implementation="eager").to(hf_device).eval()
    hidden = [hf(torch.tensor([p], device=hf_device)).last_hidden_state[0].float().cpu() for p in prompts]
    worst = {}
    for ptype in ("MEAN", "LAST"):
        llm = LLM(emb_dir, device="cuda", num_gpu_blocks_override=512, max_num_batched_tokens=32, max_num_seqs=6,
                  pooler_config={"pooling_type": ptype})
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        ref = [torch.nn.functional.normalize(h.mean(0) if ptype == "MEAN" else h[-1], dim=0) for h in hidden]
        worst[ptype] = max((torch.tensor(o.outputs.embedding) - r).abs().max().item() for o, r in zip(outs, ref))
        del llm
    hf = AutoModelForSequenceClassification.from_pretrained(cls_dir, dtype=torch.float32,
                                                            attn_implementation="eager").to(hf_device).eval()
    probs = [hf(torch.tensor([p], device=hf_device)).logits[0].float().softmax(-1).cpu() for p in prompts]
    outs = LLM(cls_dir, device="cuda", num_gpu_blocks_override=512).classify([{"prompt_token_ids": p} for p in prompts],
                                                                            use_tqdm=False)
    worst["classify"] = max((torch.tensor(o.outputs.probs) - r).abs().max().item() for o, r in zip(outs, probs))
    ok = all(v < 1e-3 for v in worst.values())
    summary = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    print(f"{os.path.basename(path)} (pooling): max abs diff vs HF {summary}{'' if ok else ' MISMATCH'}", flush=True)
    return ok


@torch.no_grad()
def check_bert(hf_device: str = "cuda") -> bool:
    """A tiny BERT (mean-pooling sentence-transformers model) and a BERT cross-encoder against transformers."""
    from pooling_models import build_bert
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from pagellm import LLM

    tmp = tempfile.mkdtemp(prefix="pagellm-bert-")
    emb, cross = build_bert(os.path.join(tmp, "embed"), pooling="mean_tokens"), build_bert(os.path.join(tmp, "x"), 1)
    texts = ["the quick brown fox jumps over the lazy dog", "to be, or not to be", "paged attention stores keys"] * 3
    tok = AutoTokenizer.from_pretrained(emb)
    hf = AutoModel.from_pretrained(emb).to(hf_device).eval()
    ref = [torch.nn.functional.normalize(hf(**tok(t, return_tensors="pt").to(hf_device)).last_hidden_state[0]
                                         .mean(0), dim=0).cpu() for t in texts]
    outs = LLM(emb, device="cuda").embed(texts, use_tqdm=False)
    worst = {"embed": max((torch.tensor(o.outputs.embedding) - r).abs().max().item() for o, r in zip(outs, ref))}
    tok = AutoTokenizer.from_pretrained(cross)
    hf = AutoModelForSequenceClassification.from_pretrained(cross).to(hf_device).eval()
    ref = [hf(**tok(texts[0], t, return_tensors="pt").to(hf_device)).logits[0, 0].sigmoid().item() for t in texts]
    outs = LLM(cross, device="cuda").score(texts[0], texts, use_tqdm=False)
    worst["score"] = max(abs(o.outputs.score - r) for o, r in zip(outs, ref))
    ok = all(v < 1e-3 for v in worst.values())
    summary = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    print(f"bert (pooling): max abs diff vs HF {summary}{'' if ok else ' MISMATCH'}", flush=True)
    return ok


@torch.no_grad()
def check_vlm(kind: str, hf_device: str = "cuda", enforce_eager: bool = False) -> bool:
    """A tiny vision-language model (llava: CLIP + LLaMA; qwen2-vl: M-RoPE; gemma3: images attending to themselves
    both ways; qwen3_5: the hybrid decoder; gemma4: both ways in the sliding layers) with prompts of zero to two
    images, prompts whole and in 8-token chunks (72 for gemma4, whose images go whole into a step), against
    transformers on the same device: greedy tokens equal."""
    from multimodal_models import (
        build_gemma3,
        build_gemma4,
        build_llava,
        build_llava_next,
        build_mistral3,
        build_qwen2_vl,
        build_qwen3_5,
        images,
    )
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from pagellm import LLM, SamplingParams

    tmp = tempfile.mkdtemp(prefix=f"pagellm-{kind}-")
    build = {"llava": build_llava, "llava-next": build_llava_next, "qwen2-vl": build_qwen2_vl,
             "gemma3": build_gemma3, "mistral3": build_mistral3, "qwen3_5": build_qwen3_5, "gemma4": build_gemma4}[kind]
    path = build(os.path.join(tmp, kind))
    qwen = "<|vision_start|><|image_pad|><|vision_end|>"
    ph = {"llava": "<image>", "llava-next": "<image>", "qwen2-vl": qwen, "gemma3": "<start_of_image>",
          "mistral3": "[IMG]", "qwen3_5": qwen, "gemma4": "<image_soft_token>"}[kind]
    imgs = images(3)
    prompts = [{"prompt": f"The quick {ph} brown fox", "multi_modal_data": {"image": imgs[0]}},
               {"prompt": f"{ph}To be{ph}, or not", "multi_modal_data": {"image": imgs[1:]}},
               "Paged attention stores keys"]
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager").to(hf_device).eval()
    side = {"patch_size": {"height": 14, "width": 14}} if kind == "mistral3" else {}  # PixtralProcessor's patches
    proc = AutoImageProcessor.from_pretrained(path, **side)
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ok = True
    for chunk in (None, 72 if kind == "gemma4" else 8):
        llm = LLM(path, device="cuda", max_model_len=512 if kind == "gemma4" else 256, enforce_eager=enforce_eager,
                  max_num_batched_tokens=chunk)
        for p, out in zip(prompts, llm.generate(prompts, sp, use_tqdm=False)):
            ids = torch.tensor([out.prompt_token_ids], device=hf_device)
            kw = {}
            if isinstance(p, dict):
                ims = p["multi_modal_data"]["image"]
                x = proc(images=ims if isinstance(ims, list) else [ims], return_tensors="pt")
                kw["pixel_values"] = x["pixel_values"].to(hf_device)
                if "image_sizes" in x:
                    kw["image_sizes"] = x["image_sizes"].to(hf_device)
                if "image_grid_thw" in x:
                    kw["image_grid_thw"] = x["image_grid_thw"].to(hf_device)
                    kw["mm_token_type_ids"] = (ids == hf.config.image_token_id).int()
                if kind == "gemma3":  # the processor's marks: image positions attend to each other both ways
                    kw["token_type_ids"] = (ids == hf.config.image_token_index).long()
                if "image_position_ids" in x:  # Gemma 4: each patch's (x, y), and the image positions
                    kw["image_position_ids"] = x["image_position_ids"].to(hf_device)
                    kw["mm_token_type_ids"] = (ids == hf.config.image_token_id).long()
            ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **kw)[0, ids.shape[1]:].tolist()
            ok &= list(out.outputs[0].token_ids) == ref
        del llm
    print(f"{kind} (images, {'eager' if enforce_eager else 'graphs'}): {'equal to HF' if ok else 'MISMATCH'}",
          flush=True)
    return ok


def main() -> int:
    args = sys.argv[1:]
    eager = "--enforce-eager" in args
    overlap = "--no-async-scheduling" not in args
    backend = args[args.index("--attention-backend") + 1] if "--attention-backend" in args else "auto"
    hf_device = args[args.index("--hf-device") + 1] if "--hf-device" in args else "cuda"
    steps = int(args[args.index("--num-scheduler-steps") + 1]) if "--num-scheduler-steps" in args else 1
    spec = int(args[args.index("--speculative") + 1]) if "--speculative" in args else 0
    draft = args[args.index("--draft-model") + 1] if "--draft-model" in args else None
    valued = ("--attention-backend", "--hf-device", "--num-scheduler-steps", "--speculative", "--draft-model")
    lora = "--lora" in args
    paths = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] not in valued)]
    if not paths:
        from make_models import build

        paths = list(build(os.path.join(ROOT, "tests", ".models")).values())
        paths.append(os.path.join(ROOT, "pagellm", "assets", "shakespeare-llama"))
    if "--images" in args:
        kinds = ("llava", "llava-next", "qwen2-vl", "gemma3", "mistral3", "qwen3_5", "gemma4")
        return 0 if all([check_vlm(k, hf_device, eager) for k in kinds]) else 1
    if "--pooling" in args:
        return 0 if all([check_pooling(p, hf_device) for p in paths] + [check_bert(hf_device)]) else 1
    results = [check(p, enforce_eager=eager, async_scheduling=overlap, attention_backend=backend, hf_device=hf_device,
                     num_scheduler_steps=steps, speculative=spec or (3 if draft else 0), lora=lora, draft=draft)
               for p in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
