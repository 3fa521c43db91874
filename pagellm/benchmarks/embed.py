"""Embedding throughput: pagellm's pooling runner against transformers on the same prompts, median over rounds.

    pagellm bench embed [--model DIR] [--num-prompts 256] [--min-len 16] [--max-len 256] [--prefix-len 0]
        [--pooling LAST|MEAN] [--hf-batch-size 32] [--rounds 3] [--device cpu|cuda]

The model's decoder runs as an embedding model (`runner="pooling"`; a causal checkpoint such as the demo model
works: its LM head is not loaded; so does an encoder such as BERT). Prompts are random token ids (no special
tokens) with lengths uniform in [min-len, max-len], new ones each round; with --prefix-len N every prompt
starts with the same N tokens (an instruction, as embedding models such as e5 or Qwen3-Embedding prepend), which
pagellm's prefix cache computes once (LAST pooling).
transformers runs them the way sentence-transformers does: sorted by length, in padded batches of
--hf-batch-size with an attention mask, pooled (last real token, or the mean over real tokens) and L2-normalized.
pagellm packs the prompts without padding, in steps of up to max_num_batched_tokens tokens. Printed: prompts/s
and prompt tokens/s of each (medians of --rounds, run alternately), the ratio, and the largest difference between
the two sets of embeddings.
"""

from __future__ import annotations

import argparse
import random

from pagellm.benchmarks.common import add_model_args, llm_kwargs, median_times, write_report


def hf_embed(model, prompts: list[list[int]], batch_size: int, pooling: str, device: str):
    """sentence-transformers' way: length-sorted padded batches, masked pooling, L2 normalization."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
                mask[r, :len(prompts[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            if pooling == "MEAN":
                pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:
                pooled = h[torch.arange(len(idx), device=device), mask.sum(1) - 1]
            pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu()
            for r, i in enumerate(idx):
                out[i] = pooled[r]
    return torch.stack(out)


def main(ns: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModel

    from pagellm import LLM

    llm = LLM(ns.model, **llm_kwargs(ns.model, runner="pooling", dtype=ns.dtype, device=ns.device,
                                     load_format=ns.load_format, pooler_config={"pooling_type": ns.pooling},
                                     max_num_seqs=ns.num_prompts, max_model_len=ns.prefix_len + ns.max_len))
    dtype = getattr(torch, llm.llm_engine.config.model.dtype)
    hf = AutoModel.from_pretrained(ns.model, dtype=dtype).to(ns.device).eval()
    vocab = llm.llm_engine.config.model.vocab_size
    tok = llm.get_tokenizer()
    special = set(tok.all_special_ids) if tok is not None else set()
    ids = [i for i in range(vocab) if i not in special]  # no [SEP] / <pad> mid-prompt: plain text's tokens
    prefix = [random.Random(-1).choice(ids) for _ in range(ns.prefix_len)]

    def make_prompts(seed: int) -> list[list[int]]:  # new prompts each round: no round reuses another's cache
        rng = random.Random(seed)
        return [prefix + [rng.choice(ids) for _ in range(rng.randint(ns.min_len, ns.max_len))]
                for _ in range(ns.num_prompts)]

    def run_pagellm(prompts):
        return torch.tensor([o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in prompts],
                                                                    use_tqdm=False)])

    def run_hf(prompts):
        return hf_embed(hf, prompts, ns.hf_batch_size, ns.pooling, ns.device)

    runs = {"pagellm": run_pagellm, f"transformers (batches of {ns.hf_batch_size})": run_hf}
    warm = make_prompts(ns.rounds)
    a, b = (fn(warm) for fn in runs.values())  # warm-up, and the embeddings compared below
    diff = float((a - b).abs().max())
    rounds = [make_prompts(r) for r in range(ns.rounds)]
    tokens = sum(len(p) for prompts in rounds for p in prompts) // ns.rounds  # per round, on average
    med = median_times(runs, rounds, ns.device)
    first = next(iter(med.values()))
    shared = f" after a shared {ns.prefix_len}-token prefix" if ns.prefix_len else ""
    print(f"{ns.num_prompts} prompts of {ns.min_len}-{ns.max_len} tokens{shared} ({tokens} per round), {ns.pooling} "
          "pooling, "
          f"{llm.llm_engine.config.model.dtype} on {ns.device}; medians of {ns.rounds} rounds")
    for name, t in med.items():
        print(f"  {name:34s} {ns.num_prompts / t:9.1f} prompts/s {tokens / t:10.0f} tok/s  {first / t:5.2f}x")
    print(f"  pagellm / transformers: {med[list(med)[1]] / first:.2f}x; largest embedding difference {diff:.2e}")
    report = {"model": ns.model, "num_prompts": ns.num_prompts, "tokens": tokens, "prefix_len": ns.prefix_len,
              "pooling": ns.pooling,
              "rounds": ns.rounds, "seconds": med, "speedup": med[list(med)[1]] / first, "max_abs_diff": diff}
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, dtypes=False)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--prefix-len", type=int, default=0, help="Tokens every prompt starts with (an instruction).")
    p.add_argument("--pooling", default="LAST", choices=["LAST", "MEAN"])
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", default=None)
