"""The host's own work per decode step: the engine step's thread time minus the model, the LM head and
the sampler (the parts a GPU takes over), at a full batch of plain greedy requests.

    python benchmarks/host_step.py [--model DIR] [--batch-size 256] [--steps 100] [--async-scheduling]
                                   [--num-scheduler-steps K]

On a GPU the host's work is what the GPU waits for when it exceeds the GPU's busy time, and it is the same
Python on any machine, so it is measured here on CPU with a tiny model (the default: the test llama
checkpoint) and one torch thread. Prints the median over --steps engine steps, per decode step (an engine
step of a multi-step decode runs K of them); compare two versions by alternating runs on the same machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", ".models", "llama"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--num-scheduler-steps", type=int, default=1)
    ns = ap.parse_args()

    import torch

    from pagellm import LLM, SamplingParams
    from pagellm.sampling_params import RequestOutputKind

    torch.set_num_threads(1)
    llm = LLM(ns.model, max_num_seqs=ns.batch_size, async_scheduling=ns.async_scheduling,
              num_scheduler_steps=ns.num_scheduler_steps)
    engine = llm.llm_engine
    runner = engine.executor.runner
    excluded = [0.0]

    def timed(obj, name: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                excluded[0] += time.thread_time() - t

        setattr(obj, name, wrapper)

    timed(runner.model, "forward")
    timed(runner.model, "compute_logits")
    timed(runner, "sampler")
    rng = random.Random(0)
    vocab = engine.config.model.vocab_size
    max_tokens = engine.config.scheduler.max_model_len - ns.input_len
    if max_tokens < (ns.steps + 10) * ns.num_scheduler_steps:
        raise SystemExit(f"--input-len {ns.input_len} leaves too few output tokens for {ns.steps} steps")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(ns.batch_size):
        engine.add_request(str(i), {"prompt_token_ids": [rng.randrange(vocab) for _ in range(ns.input_len)]}, params)
    for _ in range(8):  # prompts done
        engine.step()
    host = []
    counters = engine.stats
    for _ in range(ns.steps):
        excluded[0] = 0.0
        before = counters.device_steps
        t = time.thread_time()
        engine.step()
        host.append((time.thread_time() - t - excluded[0]) / max(1, counters.device_steps - before))
    running = engine.get_stats().num_running_reqs
    print(f"host work per decode step at batch {running} (async scheduling "
          f"{'on' if ns.async_scheduling else 'off'}, {ns.num_scheduler_steps} scheduler step(s)): median "
          f"{statistics.median(host) * 1e3:.3f} ms over {ns.steps} engine steps")


if __name__ == "__main__":
    main()
