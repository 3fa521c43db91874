"""What switching an engine between rollouts costs: sleep mode and weight updates against starting it again.

    pagellm bench sleep [--model DIR] [--rounds 3] [--dtype ...]

Per round, each way of getting from "the memory is given away" back to "a request answered" is timed, median over
the rounds:

    cold start         LLM(model) built again (weights read from disk, KV cache allocated), then one request
    sleep 1 / wake     sleep(level=1) (weights to host memory, cache freed), wake_up(), one request
    sleep 2 / reload   sleep(level=2) (nothing kept), wake_up(), reload_weights() from disk, one request
    update_weights     a full state dict (held in memory, as a trainer holds it) into the live weights, one request

Each line prints its ratio to the cold start, and the bytes sleep mode gave back.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from pagellm.benchmarks.common import add_model_args, llm_kwargs, write_report


def main(ns: argparse.Namespace) -> dict:
    from pagellm import LLM, SamplingParams
    from pagellm.models.loader import iterate_weights
    from pagellm.models.weight_utils import ckpt_full

    if ns.load_format == "dummy":
        raise ValueError("bench sleep reloads the weights from the checkpoint: --load-format dummy has none.")
    kw = llm_kwargs(ns.model, dtype=ns.dtype, kv_cache_dtype=ns.kv_cache_dtype, quantization=ns.quantization,
                    load_format=ns.load_format, enable_sleep_mode=True, device=ns.device,
                    kv_cache_memory=ns.kv_cache_memory)
    params = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(1, 1 + ns.input_len))}]

    def answer(llm: LLM) -> list[int]:
        return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids

    llm = LLM(ns.model, **kw)
    reference = answer(llm)
    state = {name: ckpt_full(t).clone() for name, t in iterate_weights(ns.model, progress=False)}
    times: dict[str, list[float]] = {"one request": [], "cold start": [], "sleep 1 / wake": [],
                                     "sleep 2 / reload": [], "update_weights": []}
    freed = {}

    def timed(name: str, fn, *args) -> None:
        t = time.perf_counter()
        out = fn(*args)
        times[name].append(time.perf_counter() - t)
        if out != reference:
            raise RuntimeError(f"{name}: the answer changed ({out[:8]} vs {reference[:8]})")

    def cold(holder: dict) -> list[int]:
        holder["llm"] = LLM(ns.model, **kw)
        return answer(holder["llm"])

    def level(engine: LLM, n: int) -> list[int]:
        engine.sleep(n)
        freed[n] = engine.collective_rpc(lambda w: w.memory.bytes_freed)[0]
        engine.wake_up()
        if n == 2:
            engine.reload_weights()
        return answer(engine)

    def update(engine: LLM) -> list[int]:
        engine.update_weights(state)
        return answer(engine)

    for _ in range(ns.rounds):
        llm.shutdown()
        del llm
        gc.collect()
        holder: dict = {}
        timed("cold start", cold, holder)
        llm = holder.pop("llm")
        timed("one request", answer, llm)  # (the part of every line below that is not switching)
        timed("sleep 1 / wake", level, llm, 1)
        timed("sleep 2 / reload", level, llm, 2)
        if ns.quantization is None:  # (quantized weights are not updated in place)
            timed("update_weights", update, llm)
    llm.shutdown()
    cold_s = statistics.median(times["cold start"])
    report = {"model": ns.model, "rounds": ns.rounds, "bytes_freed": {f"level{k}": v for k, v in freed.items()},
              "weights_bytes": sum(t.numel() * t.element_size() for t in state.values()),
              "seconds": {k: statistics.median(v) for k, v in times.items() if v}}
    print(f"{ns.model}: {report['weights_bytes'] / 2**20:.0f} MiB of checkpoint tensors; sleep gave back "
          f"{freed.get(1, 0) / 2**20:.0f} MiB at level 1, {freed.get(2, 0) / 2**20:.0f} MiB at level 2 (on a CPU "
          f"level 1 keeps the weights); median of {ns.rounds} rounds, each ending with one request of "
          f"{ns.input_len} + {ns.output_len} tokens:")
    base = report["seconds"]["one request"]
    for name, s in report["seconds"].items():
        vs = "" if name == "one request" else \
            f"   {cold_s / s:5.1f}x faster than a cold start ({s - base:.3f} s besides the request)"
        print(f"  {name:17s} {s:7.3f} s{vs}")
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="Bytes for the KV cache (default: the engine's).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--output-json", default=None)
