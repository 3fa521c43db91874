"""Speculative decoding side by side: the same requests with and without drafts, median over rounds.

    pagellm bench speculative [--model DIR] [--num-speculative-tokens 4] [--prompt-lookup-max 3]
        [--prompt-lookup-min 1] [--draft-model DIR] [--batch-size 1] [--output-len 128] [--temperature 0]
        [--rounds 5] [--prompts FILE]

Two engines on the same model, one with `speculative_config` (method ngram, or method draft_model with
--draft-model: a smaller model with the same tokenizer proposes the drafts), one without, run the same
batch of requests in turn (the order alternating each round, so drift on a shared machine hits both). A
round's time is the whole `generate` call. Printed: each engine's median output tokens/s and their ratio,
the engine steps per output token, the draft tokens accepted, the mean tokens a sequence step with drafts
yields, and whether both engines gave the same tokens (they must: speculation changes the schedule, not the
output). The prompts default to a few openings the demo model continues; --prompts reads one per line.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pagellm.benchmarks.common import add_model_args, llm_kwargs, write_report

DEFAULT_PROMPTS = ["My lord,", "To be, or not to be", "What light through yonder window", "Now is the winter",
                   "O Romeo", "Friends, Romans, countrymen", "Is this a dagger", "First Citizen:\nBefore we proceed"]


def _run(llm, prompts, params) -> tuple[float, list[list[int]], int, tuple[int, int, int]]:
    engine = llm.llm_engine
    steps0, s0 = engine.stats.num_steps, engine.get_stats()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    s1 = engine.get_stats()
    spec = (s1.spec_num_drafts - s0.spec_num_drafts, s1.spec_num_draft_tokens - s0.spec_num_draft_tokens,
            s1.spec_num_accepted_tokens - s0.spec_num_accepted_tokens)
    return elapsed, [c.token_ids for o in outs for c in o.outputs], engine.stats.num_steps - steps0, spec


def main(ns: argparse.Namespace) -> dict:
    from pagellm import LLM, SamplingParams

    if ns.prompts:
        with open(ns.prompts) as f:
            base = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    else:
        base = DEFAULT_PROMPTS
    prompts = [base[i % len(base)] for i in range(ns.batch_size)]
    if ns.draft_model:
        spec = {"method": "draft_model", "model": ns.draft_model, "num_speculative_tokens": ns.num_speculative_tokens}
        label, drafts_from = "draft", f"draft model {ns.draft_model}"
    else:
        spec = {"method": "ngram", "num_speculative_tokens": ns.num_speculative_tokens,
                "prompt_lookup_max": ns.prompt_lookup_max, "prompt_lookup_min": ns.prompt_lookup_min}
        label, drafts_from = "ngram", f"n-gram {ns.prompt_lookup_min}-{ns.prompt_lookup_max}"
    kw = llm_kwargs(ns.model, load_format=ns.load_format, dtype=ns.dtype, kv_cache_dtype=ns.kv_cache_dtype,
                    quantization=ns.quantization, device=ns.device, seed=0, max_num_seqs=max(ns.batch_size, 1))
    engines = {"plain": LLM(ns.model, **kw), label: LLM(ns.model, speculative_config=spec, **kw)}
    params = SamplingParams(temperature=ns.temperature, seed=1 if ns.temperature else None,
                            max_tokens=ns.output_len, ignore_eos=ns.ignore_eos)
    for llm in engines.values():  # warm-up
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[list[int]]] = {}
    steps: dict[str, int] = {}
    spec_counts = (0, 0, 0)
    for r in range(ns.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            elapsed, toks, n_steps, counts = _run(engines[name], prompts, params)
            times[name].append(elapsed)
            tokens[name], steps[name] = toks, n_steps
            if name == label:
                spec_counts = counts
    n_out = sum(len(t) for t in tokens["plain"])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    drafts, drafted, kept = spec_counts
    report = {
        "model": ns.model, "batch_size": ns.batch_size, "output_len": ns.output_len, "temperature": ns.temperature,
        "speculative_config": spec, "rounds": ns.rounds, "output_tokens": n_out,
        "method": spec["method"], "plain_tok_s": n_out / med["plain"], "spec_tok_s": n_out / med[label],
        "speedup": med["plain"] / med[label],
        "steps_per_token": {name: steps[name] / max(n_out, 1) for name in steps},
        "acceptance_rate": kept / drafted if drafted else 0.0,
        "tokens_per_step_with_drafts": 1 + kept / drafts if drafts else 1.0,
        "same_tokens": tokens["plain"] == tokens[label],
    }
    print(f"{ns.batch_size} request(s) x {ns.output_len} tokens, temperature {ns.temperature}, "
          f"{ns.num_speculative_tokens} drafts ({drafts_from}), "
          f"medians of {ns.rounds} rounds")
    print(f"  plain : {report['plain_tok_s']:8.1f} output tok/s, {report['steps_per_token']['plain']:.2f} steps/token")
    print(f"  {label:6s}: {report['spec_tok_s']:8.1f} output tok/s, {report['steps_per_token'][label]:.2f} steps/token"
          f"  -> {report['speedup']:.2f}x")
    print(f"  drafts accepted {kept}/{drafted} ({100 * report['acceptance_rate']:.0f}%), "
          f"{report['tokens_per_step_with_drafts']:.2f} tokens per sequence step with drafts; "
          f"same tokens as plain decoding: {'yes' if report['same_tokens'] else 'NO'}")
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-max", type=int, default=3)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--draft-model", default=None,
                   help="A draft checkpoint with the model's tokenizer (method draft_model) instead of n-grams.")
    p.add_argument("--batch-size", type=int, default=1, help="Requests run together (the prompts, cycled).")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling.")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", default=None, help="A file with one prompt per line (\\n for a newline).")
    p.add_argument("--output-json", default=None)
