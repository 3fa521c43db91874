"""What serving LoRA adapters costs: the same requests on the base model and through adapters, median over rounds.

    pagellm bench lora [--model DIR] [--rank 16] [--num-adapters 2] [--num-prompts 16] [--output-len 64]
        [--rounds 3] [--target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]

Random adapters of the given rank are written with PEFT (pip install peft) into a temporary directory. One
engine without LoRA and one with `enable_lora` (max_loras = the number of adapters) run, in turn each round:
the base model on the LoRA-less engine, the base model on the LoRA engine (what enabling costs a request
that names no adapter), every request on adapter 1, and the requests spread over all adapters. Printed:
output tokens/s of each, as a ratio of the first.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from pagellm.benchmarks.common import add_model_args, llm_kwargs, write_report


def make_adapters(model: str, rank: int, targets: list[str], n: int, out_dir: str) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        path = os.path.join(out_dir, f"adapter{i + 1}")
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def main(ns: argparse.Namespace) -> dict:
    from pagellm import LLM, LoRARequest, SamplingParams

    targets = ns.target_modules.split(",")
    kw = llm_kwargs(ns.model, dtype=ns.dtype, seed=0, max_num_seqs=max(ns.num_prompts, 1))
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(ns.model, ns.rank, targets, ns.num_adapters, tmp)
        loras = [LoRARequest(f"adapter{i + 1}", i + 1, p) for i, p in enumerate(paths)]
        plain = LLM(ns.model, **kw)
        lora_llm = LLM(ns.model, enable_lora=True, max_loras=ns.num_adapters, max_lora_rank=ns.rank, **kw)
        vocab = plain.llm_engine.config.model.vocab_size
        prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(ns.input_len)]}
                   for _ in range(ns.num_prompts)]
        params = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True)
        runs = {
            "base model, no LoRA engine": (plain, None),
            "base model, LoRA engine": (lora_llm, None),
            "one adapter": (lora_llm, loras[0]),
            f"{ns.num_adapters} adapters mixed": (lora_llm, [loras[i % len(loras)] for i in range(ns.num_prompts)]),
        }
        for llm, lr in runs.values():  # warm-up (loads the adapters)
            llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False,
                         lora_request=lr[:2] if isinstance(lr, list) else lr)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(ns.rounds):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                llm, lr = runs[name]
                t = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False, lora_request=lr)
                times[name].append(time.perf_counter() - t)
    tokens = ns.num_prompts * ns.output_len
    tok_s = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    first = next(iter(tok_s.values()))
    print(f"{ns.num_prompts} requests x ({ns.input_len} in, {ns.output_len} out), rank {ns.rank} on "
          f"{', '.join(targets)}; medians of {ns.rounds} rounds")
    for name, v in tok_s.items():
        print(f"  {name:32s} {v:9.1f} output tok/s  {v / first:5.2f}x")
    report = {"model": ns.model, "rank": ns.rank, "targets": targets, "num_prompts": ns.num_prompts,
              "output_len": ns.output_len, "rounds": ns.rounds, "tok_s": tok_s,
              "ratio": {name: v / first for name, v in tok_s.items()}}
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, dtypes=False)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-adapters", type=int, default=2)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", default=None)
