"""Quality of a low-precision run against the full-precision model, on held-out text.

    pagellm bench quality [--model DIR] [--quantization int8] [--kv-cache-dtype fp8] [--dtype bfloat16]

The reference is the same checkpoint unquantized, with float32 weights and cache (--reference-dtype).
Both engines run in this process, one after the other, on the same inputs, and the report gives:

    agreement (teacher-forced)  over each reference greedy continuation, the share of positions where the
                                candidate's greedy choice, given the same preceding tokens, is the reference's
    agreement (free-running)    the share of positions where the two greedy outputs hold the same token;
                                after a first difference the texts drift apart, so this is a lower bound
    perplexity                  on the validation text (windows of --ppl-window tokens), and the ratio of the
                                candidate's to the reference's

Prompts are --num-prompts windows of --prompt-len tokens spread evenly over the validation text (the
held-out part of the demo model's corpus by default, --text FILE otherwise). Prompts are prefilled in chunks of
--chunk tokens, so every chunk after the first attends over K/V read back from the cache: an 8-bit
cache is measured, not bypassed by the first prefill.
"""

from __future__ import annotations

import argparse
import math
import os
import time

from pagellm.benchmarks.common import add_model_args, write_report

VAL_TEXT = os.path.join(os.path.dirname(__file__), "data", "shakespeare_val.txt")


def run_engine(model: str, kw: dict, prompts: list[list[int]], continuations: list[list[int]] | None,
               windows: list[list[int]], max_tokens: int) -> dict:
    """Greedy outputs of `prompts`, the rank-1 share over the reference continuations, and the log-likelihood of
    `windows`, for one engine configuration."""
    import gc

    from pagellm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, **kw)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    top1 = total = 0
    if continuations is not None:  # teacher-forced: the reference's text as the prompt
        seqs = [p + c for p, c in zip(prompts, continuations)]
        outs = llm.generate([{"prompt_token_ids": s} for s in seqs], scoring, use_tqdm=False)
        for o, p, s in zip(outs, prompts, seqs):
            for pos in range(len(p), len(s)):
                top1 += o.prompt_logprobs[pos][s[pos]].rank == 1
                total += 1
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], scoring, use_tqdm=False)
    nll = -sum(o.prompt_logprobs[i][w[i]].logprob for o, w in zip(outs, windows) for i in range(1, len(w)))
    count = sum(len(w) - 1 for w in windows)
    del llm
    gc.collect()
    return {"tokens": tokens, "teacher_forced_top1": top1 / total if total else None, "nll": nll, "count": count,
            "perplexity": math.exp(nll / count), "seconds": time.perf_counter() - t0}


def inputs(ns: argparse.Namespace) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, perplexity windows) from the validation text."""
    from transformers import AutoTokenizer

    with open(ns.text) as f:
        ids = AutoTokenizer.from_pretrained(ns.model)(f.read(), verbose=False)["input_ids"]
    need = ns.prompt_len + ns.max_tokens
    if len(ids) < need:
        raise ValueError(f"{ns.text} has {len(ids)} tokens; a prompt and its output need {need}.")
    step = max(1, (len(ids) - need) // max(1, ns.num_prompts - 1))
    prompts = [ids[i * step:i * step + ns.prompt_len] for i in range(ns.num_prompts)]
    w = ns.ppl_window
    windows = [ids[s:s + w] for s in range(0, len(ids) - w + 1, w)][:ns.ppl_windows]
    return prompts, windows


def main(ns: argparse.Namespace) -> dict:
    from pagellm.benchmarks.common import llm_kwargs

    prompts, windows = inputs(ns)
    common = dict(load_format=ns.load_format, max_num_batched_tokens=ns.chunk, enable_prefix_caching=False,
                  max_model_len=max(ns.prompt_len + ns.max_tokens, ns.ppl_window) + 1, seed=0)
    if ns.threads:
        common["num_threads"] = ns.threads
    ref_kw = llm_kwargs(ns.model, dtype=ns.reference_dtype, **common)
    cand_kw = llm_kwargs(ns.model, dtype=ns.dtype, kv_cache_dtype=ns.kv_cache_dtype, quantization=ns.quantization,
                         **common)
    label = (f"dtype {ns.dtype}, quantization {ns.quantization or 'none'}, kv cache {ns.kv_cache_dtype}")
    print(f"{len(prompts)} prompts x {ns.prompt_len} tokens -> {ns.max_tokens} greedy tokens; perplexity over "
          f"{len(windows)} windows x {ns.ppl_window} tokens of {os.path.basename(ns.text)}", flush=True)
    ref = run_engine(ns.model, ref_kw, prompts, None, windows, ns.max_tokens)
    cand = run_engine(ns.model, cand_kw, prompts, ref["tokens"], windows, ns.max_tokens)
    same = sum(a == b for x, y in zip(ref["tokens"], cand["tokens"]) for a, b in zip(x, y))
    n = sum(len(x) for x in ref["tokens"])
    free = same / n
    ratio = cand["perplexity"] / ref["perplexity"]
    report = {"model": ns.model, "candidate": label, "reference": f"dtype {ns.reference_dtype}",
              "num_prompts": len(prompts), "prompt_len": ns.prompt_len, "max_tokens": ns.max_tokens,
              "agreement_teacher_forced": cand["teacher_forced_top1"], "agreement_free_running": free,
              "perplexity_reference": ref["perplexity"], "perplexity_candidate": cand["perplexity"],
              "perplexity_ratio": ratio, "ppl_tokens": ref["count"]}
    print(f"{'':<34}{'reference':>12}{'candidate':>12}")
    print(f"{'perplexity':<34}{ref['perplexity']:>12.3f}{cand['perplexity']:>12.3f}   ratio {ratio:.4f} "
          f"({100 * (ratio - 1):+.2f}%)")
    print(f"greedy agreement, teacher-forced: {100 * cand['teacher_forced_top1']:.1f}% of {n} tokens")
    print(f"greedy agreement, free-running:   {100 * free:.1f}% of {n} tokens")
    print(f"candidate: {label}; reference: dtype {ns.reference_dtype}")
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--reference-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--text", default=VAL_TEXT, help="Validation text (default: the demo model's held-out text).")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=36, help="Windows scored for perplexity (at most).")
    p.add_argument("--chunk", type=int, default=32, help="Prefill chunk (max_num_batched_tokens) of both engines.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output-json", default=None)
