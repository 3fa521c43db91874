"""Check the engine on a CUDA GPU against Hugging Face on the same GPU (greedy tokens, logprobs).

    python scripts/check_cuda.py [--enforce-eager] [--no-async-scheduling] [--attention-backend NAME]
                                 [--hf-device cpu] [--num-scheduler-steps K] [--speculative K] [MODEL_DIR ...]
        (default: the tiny test checkpoints, built if missing, and the demo model)

Runs pagellm with device="cuda" (the default attention backend there: the Triton kernel; decode
batches through CUDA graphs unless --enforce-eager; the next step scheduled while one runs unless
--no-async-scheduling; K decode steps per scheduling round with --num-scheduler-steps; K n-gram draft tokens
per step with --speculative, whose steps with drafts run eagerly) and transformers on
the same checkpoint and prompts; prints per-model
agreement and exits non-zero on any mismatch. `--hf-device cpu` runs the reference on the CPU instead
(to tell a GPU-side difference of transformers from one of pagellm).
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))


def check(path: str, n_prompts: int = 8, max_tokens: int = 24, enforce_eager: bool = False,
          async_scheduling: bool = True, attention_backend: str = "auto", hf_device: str = "cuda",
          num_scheduler_steps: int = 1, speculative: int = 0) -> bool:
    from transformers import AutoModelForCausalLM

    from pagellm import LLM, SamplingParams

    llm = LLM(path, device="cuda", num_gpu_blocks_override=512, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling, max_num_seqs=6,  # fewer rows than prompts
              attention_backend=attention_backend, num_scheduler_steps=num_scheduler_steps,
              speculative_config={"method": "ngram", "num_speculative_tokens": speculative, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1} if speculative else None)
    vocab = llm.llm_engine.config.model.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(8, vocab) for _ in range(rng.randint(1, 90))] for _ in range(n_prompts)]
    if speculative:  # prompts that repeat themselves, so that drafts are found and some accepted
        prompts = [p[:12] * 4 for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    # eager attention, as in tests/hf_reference.py: SDPA drops Gemma 2's soft-capping in some releases
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
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
    if speculative:
        st = llm.llm_engine.get_stats()
        mode += f", {st.spec_num_accepted_tokens}/{st.spec_num_draft_tokens} drafts accepted"
    ref_device = torch.cuda.get_device_name() if hf_device == "cuda" else hf_device
    print(f"{os.path.basename(path)} ({mode}): {ok}/{len(prompts)} greedy outputs equal HF on "
          f"{ref_device}, max logprob diff {max_diff:.2e}, pagellm {elapsed:.2f} s", flush=True)
    return ok == len(prompts) and max_diff < 1e-3


def main() -> int:
    args = sys.argv[1:]
    eager = "--enforce-eager" in args
    overlap = "--no-async-scheduling" not in args
    backend = args[args.index("--attention-backend") + 1] if "--attention-backend" in args else "auto"
    hf_device = args[args.index("--hf-device") + 1] if "--hf-device" in args else "cuda"
    steps = int(args[args.index("--num-scheduler-steps") + 1]) if "--num-scheduler-steps" in args else 1
    spec = int(args[args.index("--speculative") + 1]) if "--speculative" in args else 0
    valued = ("--attention-backend", "--hf-device", "--num-scheduler-steps", "--speculative")
    paths = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] not in valued)]
    if not paths:
        from make_models import build

        paths = list(build(os.path.join(ROOT, "tests", ".models")).values())
        paths.append(os.path.join(ROOT, "pagellm", "assets", "shakespeare-llama"))
    results = [check(p, enforce_eager=eager, async_scheduling=overlap, attention_backend=backend, hf_device=hf_device,
                     num_scheduler_steps=steps, speculative=spec) for p in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
