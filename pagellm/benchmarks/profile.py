"""Where a decode step's time goes: wall time against device busy time, and the top kernels.

    pagellm bench profile --model DIR --load-format dummy --device cuda --batch-size 256 --input-len 250

Fills the engine with --batch-size requests of --input-len prompt tokens, steps until every prompt is
prefilled and the batch is pure decode, then times --steps decode steps twice:

    1. without a profiler: wall time per step (what the engine costs)
    2. under torch.profiler: the union of the intervals in which a GPU kernel ran (device busy time per
       step; the rest of the wall time the GPU waits for the host) and the top kernels / ops
    3. on CUDA, under torch.cuda.set_sync_debug_mode: the operations that made the host wait for the
       GPU (a blocking copy, .item(), .tolist() of a GPU tensor), per step and by source line; the
       engine's deliberate wait for a step's results is an event and is not counted, so the figure
       should be 0
    4. under cProfile: the engine's own Python functions by their own time per step (`--host-top N`),
       where the host's share of a step goes

Requests get as many output tokens as the model allows, so every window runs at the full batch. With
--num-scheduler-steps K, an engine step runs up to K decode steps on the device: the figures are per
decode step (device step) all the same.

On CPU there is no separate device: the table shows the top operators by their own CPU time, and
"busy" is not reported. `--trace FILE.json` writes the profiled window as a Chrome trace.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pagellm.benchmarks.common import add_model_args, llm_kwargs, sync_device, write_report


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def run(ns: argparse.Namespace) -> dict:
    import random

    import torch
    from torch.autograd import DeviceType

    from pagellm import LLM, SamplingParams
    from pagellm.sampling_params import RequestOutputKind

    if ns.threads:
        torch.set_num_threads(ns.threads)
    kw = llm_kwargs(ns.model, load_format=ns.load_format, dtype=ns.dtype, kv_cache_dtype=ns.kv_cache_dtype,
                    quantization=ns.quantization, device=ns.device, max_num_seqs=max(ns.batch_size, 1),
                    attention_backend=ns.attention_backend, enforce_eager=ns.enforce_eager,
                    async_scheduling=ns.async_scheduling, num_scheduler_steps=ns.num_scheduler_steps)
    if ns.kv_cache_memory:
        kw["kv_cache_memory"] = ns.kv_cache_memory
    llm = LLM(ns.model, **kw)
    engine = llm.llm_engine
    vocab = engine.config.model.vocab_size
    rng = random.Random(0)
    max_tokens = engine.config.scheduler.max_model_len - ns.input_len  # every window runs at the full batch
    need = (ns.warmup_steps + 4 * ns.steps + 8) * ns.num_scheduler_steps + ns.batch_size * ns.input_len // 512
    if max_tokens < need:
        raise ValueError(f"--input-len {ns.input_len} leaves {max_tokens} output tokens under max_model_len "
                         f"{engine.config.scheduler.max_model_len}; the windows need about {need}")
    # Final-only outputs, as LLM.generate asks for (no per-step RequestOutput objects).
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(ns.batch_size):
        engine.add_request(f"p{i}", {"prompt_token_ids": [rng.randrange(vocab) for _ in range(ns.input_len)]}, params)
    prefill_steps = 0
    scheduler = engine.scheduler
    while scheduler.waiting or any(seq.num_output_tokens == 0 for req in scheduler.running for seq in req.seqs):
        engine.step()  # until every request has its first token: the batch is pure decode
        prefill_steps += 1
    for _ in range(ns.warmup_steps):
        engine.step()

    sync_device(ns.device)
    running = engine.get_stats().num_running_reqs
    counters = engine.stats
    t0 = time.perf_counter()
    marks = []
    first = counters.device_steps
    for _ in range(ns.steps):
        engine.step()
        marks.append((time.perf_counter(), counters.device_steps))
    sync_device(ns.device)
    per_step = (counters.device_steps - first) / ns.steps  # device steps per engine step (1 without multi-step)
    wall_ms = (time.perf_counter() - t0) * 1e3 / (counters.device_steps - first)
    # The median step (host clock between step returns; robust to a noisy machine's outliers).
    median_ms = statistics.median((b - a) / (nb - na) for (a, na), (b, nb) in zip([(t0, first)] + marks, marks)) * 1e3
    steps = ns.steps * per_step  # device steps in each window below (the same rounds again: the batch is steady)

    cuda = ns.device.startswith("cuda")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(ns.steps):
            engine.step()
        sync_device(ns.device)
    if ns.trace:
        prof.export_chrome_trace(ns.trace)
    busy_ms = None
    if cuda:
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_ms = _union_us(kernels) / 1e3 / steps
    syncs = _count_syncs(engine, ns.steps, steps) if cuda else None
    host = _host_profile(engine, ns.steps, ns.host_top, steps) if ns.host_top else None
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    for avg in sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True):
        t = getattr(avg, key)
        if t <= 0:
            break
        rows.append({"name": avg.key, "ms_per_step": t / 1e3 / steps, "calls_per_step": avg.count / steps})
        if len(rows) >= ns.top:
            break
    stats = engine.get_stats()
    if stats.num_running_reqs != running:
        raise RuntimeError(f"the batch changed from {running} to {stats.num_running_reqs} during the windows")
    llm.shutdown()
    return {"model": ns.model, "device": ns.device, "dtype": ns.dtype, "batch_size": ns.batch_size,
            "input_len": ns.input_len, "prefill_steps": prefill_steps, "steps": ns.steps,
            "num_scheduler_steps": ns.num_scheduler_steps, "device_steps_per_step": per_step,
            "running": stats.num_running_reqs, "wall_ms_per_step": wall_ms, "median_step_ms": median_ms,
            "busy_ms_per_step": busy_ms,
            "async_scheduling": engine.config.scheduler.async_scheduling, "host_syncs": syncs, "top": rows,
            "host_top": host}


def host_waits(engine, steps: int) -> list[str]:
    """Run `steps` engine steps with torch's CUDA sync debugging on: where (file:line) each operation that made the
    host wait for the GPU was called."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (torch's own warning on enabling the mode also says "synchronizing")
    return [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing CUDA operation" in str(w.message)]


def _count_syncs(engine, steps: int, device_steps: float) -> dict:
    """How often, and where, `steps` engine steps made the host wait for the GPU (per device step)."""
    import collections

    where = collections.Counter(host_waits(engine, steps))
    return {"per_step": sum(where.values()) / device_steps, "where": dict(where.most_common(8))}


def _host_profile(engine, steps: int, top: int, device_steps: float) -> list[dict]:
    """Run `steps` steps under cProfile: pagellm's functions by their own time (and torch's calls from them), per
    device step."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    rows = []
    for (file, line, fn), (_, calls, own, cum, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        name = f"{file.split('pagellm/', 1)[1]}:{line}({fn})" if "pagellm/" in file else fn
        rows.append({"name": name, "own_ms_per_step": own * 1e3 / device_steps,
                     "cum_ms_per_step": cum * 1e3 / device_steps, "calls_per_step": calls / device_steps})
    rows.sort(key=lambda r: r["own_ms_per_step"], reverse=True)
    return rows[:top]


def main(ns: argparse.Namespace) -> dict:
    r = run(ns)
    print(f"decode at batch {r['running']} (prompts of {ns.input_len} tokens, {ns.warmup_steps} warm-up steps "
          f"after {r['prefill_steps']} prefill steps), {ns.steps} steps on {ns.device}"
          + (f", {r['device_steps_per_step']:.2f} device steps each (multi-step decode; figures per device step)"
             if r["device_steps_per_step"] > 1 else "") + ":")
    line = f"  wall {r['wall_ms_per_step']:.2f} ms per step (median step {r['median_step_ms']:.2f})"
    if r["busy_ms_per_step"] is not None:
        line += (f", GPU busy {r['busy_ms_per_step']:.2f} ms per step "
                 f"(wall / busy {r['wall_ms_per_step'] / max(r['busy_ms_per_step'], 1e-9):.2f}x)")
    print(line)
    if r["host_syncs"] is not None:
        print(f"  host waits for the GPU: {r['host_syncs']['per_step']:.1f} per step (async scheduling "
              f"{'on' if r['async_scheduling'] else 'off'})")
        for where, n in r["host_syncs"]["where"].items():
            print(f"    {n / (ns.steps * r['device_steps_per_step']):>5.1f}/step  {where}")
    what = "kernel" if r["busy_ms_per_step"] is not None else "operator (own CPU time)"
    print(f"  {'ms/step':>8} {'calls/step':>10}  {what}")
    for row in r["top"]:
        print(f"  {row['ms_per_step']:>8.3f} {row['calls_per_step']:>10.1f}  {row['name'][:100]}")
    if r["host_top"]:
        print(f"  host (cProfile, its own overhead included): {'own ms':>7} {'cum ms':>7} {'calls':>7}  per step")
        for row in r["host_top"]:
            print(f"  {row['own_ms_per_step']:>50.3f} {row['cum_ms_per_step']:>7.3f} {row['calls_per_step']:>7.1f}"
                  f"  {row['name'][:90]}")
    return write_report(r, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--batch-size", type=int, default=64, help="Requests decoding together.")
    p.add_argument("--input-len", type=int, default=250, help="Prompt tokens per request.")
    p.add_argument("--warmup-steps", type=int, default=5, help="Decode steps before the timed window.")
    p.add_argument("--steps", type=int, default=20, help="Decode steps timed (and then profiled).")
    p.add_argument("--top", type=int, default=15, help="Kernels / operators listed.")
    p.add_argument("--host-top", type=int, default=0, metavar="N",
                   help="Also run the steps under cProfile and list the N functions with the most own time.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="No CUDA graphs.")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="Schedule step N+1 while step N runs (default: the engine's, on for CUDA).")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="Decode steps per scheduling round (multi-step decode); figures stay per decode step.")
    p.add_argument("--trace", default=None, metavar="FILE.json", help="Write the profiled steps as a Chrome trace.")
    p.add_argument("--output-json", default=None)
