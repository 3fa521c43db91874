"""Where does pagellm's output part from Hugging Face's? Layer by layer, for one prompt and one decode step.

    python scripts/compare_layers.py MODEL_DIR [--device cuda] [--attention-backend NAME] [--prompt-len 40]

Runs the prompt through pagellm (greedy, two tokens: the prompt's step, then one decode step) with a hook
on every decoder layer, and through transformers (float32, on the CPU) with output_hidden_states. Prints,
per layer, the largest difference of the layer's output (the residual stream) for the prompt's tokens and
for the decode token, with the layer's attention settings (sliding window, soft-cap), then the logits'. The
first layer with a large difference is where to look; a difference that starts in a sliding-window layer,
or only in the decode step, names the attention path.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--prompt-len", type=int, default=40)
    ns = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from pagellm import LLM, SamplingParams

    llm = LLM(ns.model, device=ns.device, attention_backend=ns.attention_backend, enforce_eager=True,
              async_scheduling=False, num_gpu_blocks_override=64)
    runner = llm.llm_engine.executor.runner
    model = runner.model
    vocab = llm.llm_engine.config.model.vocab_size
    rng = random.Random(0)  # one generator: distinct tokens, so attention weights matter to each layer's output
    prompt = [rng.randrange(8, vocab) for _ in range(ns.prompt_len)]
    captured: list[list[torch.Tensor]] = []  # per forward pass, per layer: its output rows

    def hook(module, args, out):
        captured[-1].append((out[0] if isinstance(out, tuple) else out).detach().float().cpu())

    real_forward = model.forward

    def forward(*args, **kwargs):
        captured.append([])
        return real_forward(*args, **kwargs)

    model.forward = forward
    layers = model.model.layers
    handles = [layer.register_forward_hook(hook) for layer in layers]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=2, logprobs=5),
                       use_tqdm=False)[0].outputs[0]
    for h in handles:
        h.remove()
    prefill, decode = captured[0], captured[1]

    # eager attention, as in tests/hf_reference.py: SDPA drops Gemma 2's soft-capping in some releases
    hf = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt + out.token_ids[:1]])
        ref = hf(ids, output_hidden_states=True)
    n = len(prompt)
    cfg = hf.config
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers)
    cap = getattr(cfg, "attn_logit_softcapping", None)
    print(f"{os.path.basename(ns.model.rstrip('/'))} on {ns.device} ({runner.backend.name} attention), prompt of {n} "
          f"tokens, then one decode step; largest |pagellm - HF| of each layer's output:")
    print(f"  {'layer':>5}  {'prompt':>9}  {'decode':>9}  attention")
    # hidden_states[i + 1] is layer i's output, except the last, which HF gives after the final norm
    for i in range(len(layers) - 1):
        want = ref.hidden_states[i + 1][0]
        d_prompt = (prefill[i][:n] - want[:n]).abs().max().item()
        d_decode = (decode[i][:1] - want[n:n + 1]).abs().max().item()
        window = getattr(cfg, "sliding_window", None) if layer_types[i] == "sliding_attention" else None
        print(f"  {i:>5}  {d_prompt:9.2e}  {d_decode:9.2e}  {'window ' + str(window) if window else 'full'}"
              f"{', soft-cap ' + str(cap) if cap else ''}")
    ref_lp = torch.log_softmax(ref.logits[0].float(), -1)
    for step, (token, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        diff = max(abs(lp.logprob - ref_lp[n - 1 + step, t].item()) for t, lp in lps.items())
        print(f"  step {step}: token {token} (HF's argmax {ref_lp[n - 1 + step].argmax().item()}), largest logprob "
              f"difference over its top tokens {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
