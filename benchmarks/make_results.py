"""Run the benchmark suite and regenerate the results table in benchmarks/README.md.

    python benchmarks/make_results.py            # run everything (about 25 minutes on 2 cores), then render
    python benchmarks/make_results.py --render   # only re-render the table from benchmarks/results/*.json

Every figure in the table comes from a JSON file that `pagellm bench ... --output-json` wrote;
nothing is typed by hand. Each throughput row's ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")
GPT2 = os.path.join(HERE, "..", "pagellm", "benchmarks", "configs", "gpt2-124m")
LLAMA = os.path.join(HERE, "..", "pagellm", "benchmarks", "configs", "llama-100m")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

RUNS = {
    "peak_fp32": ["peak", "--model", GPT2, "--dtype", "float32"],
    "peak_bf16": ["peak", "--model", GPT2, "--dtype", "bfloat16"],
    "throughput_gpt2_fp32": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "float32",
                             "--compare", "hf", "--hf-single-requests", "16"],
    "throughput_gpt2_bf16": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "bfloat16",
                             "--compare", "hf", "--skip-hf-single", "--bound"],
    "throughput_gpt2_int8": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "bfloat16",
                             "--quantization", "int8", "--compare", "hf", "--skip-hf-single", "--bound"],
    "throughput_gpt2_fp8kv": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "bfloat16",
                              "--kv-cache-dtype", "fp8", "--compare", "hf", "--skip-hf-single", "--bound"],
    "throughput_gpt2_lowp": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "bfloat16",
                             "--variant", "quantization=int8", "--variant", "kv_cache_dtype=fp8",
                             "--variant", "quantization=int8,kv_cache_dtype=fp8"],
    "quality_demo_bf16": ["quality", "--dtype", "bfloat16"],
    "quality_demo_int8": ["quality", "--quantization", "int8"],
    "quality_demo_fp8kv": ["quality", "--kv-cache-dtype", "fp8"],
    "quality_demo_int8_fp8kv": ["quality", "--dtype", "bfloat16", "--quantization", "int8", "--kv-cache-dtype", "fp8"],
    "kv_demo_fp8": ["kv", "--kv-cache-dtype", "bfloat16", "--kv-cache-dtype", "fp8"],
    "throughput_gpt2_fp32_kvbf16": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "float32",
                                    "--kv-cache-dtype", "bfloat16"],
    "throughput_llama_fp32": ["throughput", "--model", LLAMA, "--load-format", "dummy", "--dtype", "float32"],
    "throughput_demo": ["throughput", "--compare", "hf", "--skip-hf-single"],
    "latency_gpt2": ["latency", "--model", GPT2, "--load-format", "dummy", "--batch-size", "16"],
    "kv_demo": ["kv"],
    "sharing_demo": ["sharing"],
    "throughput_demo_json50": ["throughput", "--structured-fraction", "0.5"],
    "throughput_gpt2_tp2": ["throughput", "--model", GPT2, "--load-format", "dummy", "--dtype", "float32",
                            "--tensor-parallel-size", "2", "--num-prompts", "32"],
}
SERVED = {"serve_demo": ["serve", "--num-prompts", "64", "--request-rate", "8", "--max-input-len", "256",
                          "--output-len", "128"]}  # against `pagellm serve` (demo)
PLOTS = os.path.join(HERE, "plots")


def run_all(only: list[str] | None) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    for name, args in RUNS.items():
        if only and name not in only:
            continue
        out = os.path.join(RESULTS, f"{name}.json")
        print(f"== {name}: pagellm bench {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "bench", *args, "--output-json", out],
                       check=True)
    for name, args in SERVED.items():
        if only and name not in only:
            continue
        sys.path.insert(0, os.path.join(HERE, ".."))
        from tests.entrypoints.server_utils import RemoteServer

        server = RemoteServer(["--num-gpu-blocks-override", "2048"])
        try:
            out = os.path.join(RESULTS, f"{name}.json")
            print(f"== {name}: pagellm bench {' '.join(args)} (against pagellm serve, demo model)", flush=True)
            subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "bench", *args, "--base-url", server.url,
                            "--output-json", out], check=True)
        finally:
            server.stop()


def make_plots() -> list[str]:
    """Draw every plot the results allow (benchmarks/plots/*.png); returns Markdown image lines."""
    from pagellm.benchmarks.plots import plot_kv, plot_serve, plot_throughput

    os.makedirs(PLOTS, exist_ok=True)
    made = []
    for name, fn, caption in (("throughput_gpt2_fp32", plot_throughput, "Throughput, GPT-2 124M fp32"),
                              ("throughput_demo_json50", plot_throughput, "Structured output cost (demo model)"),
                              ("serve_demo", plot_serve, "Serving latency (demo model, 8 req/s)"),
                              ("kv_demo", plot_kv, "KV cache over time (demo model)")):
        report = _load(name)
        if report is None:
            continue
        fn(report, os.path.join(PLOTS, f"{name}.png"))
        made.append(f"![{caption}](plots/{name}.png)")
    return made


def _load(name: str) -> dict | None:
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _throughput_rows(name: str, label: str, bound: dict | None) -> list[str]:
    r = _load(name)
    if r is None:
        return []
    label = label.format(device=r.get("device", "?"))
    res = {x["engine"]: x for x in r["results"]}
    ours = res["pagellm"]
    rows = []
    limit = r["bound"] if "bound" in r else bound["bound"] if bound else None  # measured in the run, else `peak`
    frac = f"{100 * ours['output_tokens_per_s'] / limit['output_tokens_per_s']:.0f}%" if limit else ""
    for engine, x in res.items():
        ratio = "" if engine == "pagellm" else f"{ours['output_tokens_per_s'] / x['output_tokens_per_s']:.2f}x"
        rows.append(f"| {label} | {engine} | {x['output_tokens_per_s']:.1f} | {x['total_tokens_per_s']:.1f} | "
                    f"{x['requests_per_s']:.3f} | {x['peak_rss_mb']:.0f} | {ratio} | "
                    f"{frac if engine == 'pagellm' else ''} |")
    return rows


def _kv_table(title: str, runs: list[dict]) -> list[str]:
    return ["", title, "", "| allocator | mean running | peak running | KV utilization | steps |",
            "|---|---|---|---|---|",
            *(f"| {r['name']} | {r['mean_running']:.1f} | {r['max_running']} | {100 * r['mean_utilization']:.1f}% | "
              f"{r['steps']} |" for r in runs)]


def _quality_rows() -> list[str]:
    rows = []
    for name, label in (("quality_demo_bf16", "bf16 weights and cache"), ("quality_demo_int8", "int8 weights"),
                        ("quality_demo_fp8kv", "fp8 KV cache"),
                        ("quality_demo_int8_fp8kv", "bf16 + int8 weights + fp8 KV cache")):
        q = _load(name)
        if q:
            rows.append(f"| {label} | {100 * q['agreement_teacher_forced']:.1f}% | "
                        f"{100 * q['agreement_free_running']:.1f}% | {q['perplexity_reference']:.3f} | "
                        f"{q['perplexity_candidate']:.3f} | {100 * (q['perplexity_ratio'] - 1):+.2f}% |")
    if not rows:
        return []
    return ["", "Quality against the float32 model (`pagellm bench quality`, demo model, 32 held-out prompts x 64 "
            "greedy tokens; perplexity over 36 x 256 held-out tokens):", "",
            "| setting | agreement, teacher-forced | agreement, free-running | perplexity fp32 | perplexity | "
            "change |", "|---|---|---|---|---|---|", *rows]


def render() -> str:
    lines = []
    p32, p16 = _load("peak_fp32"), _load("peak_bf16")
    if p32:
        lines.append(f"Machine: {platform.machine()}, {p32['threads']} threads; fp32 GEMM {p32['gemm_gflops']:.0f} "
                     f"GFLOP/s, bf16 GEMM {p16['gemm_gflops'] if p16 else float('nan'):.0f} GFLOP/s, memory read "
                     f"{p32['read_bandwidth_gbs']:.1f} GB/s. Workload bound (GPT-2 124M, default workload): "
                     f"{p32['bound']['output_tokens_per_s']:.0f} output tok/s in fp32"
                     + (f", {p16['bound']['output_tokens_per_s']:.0f} in bf16." if p16 else "."))
        lines.append("")
    lines += ["| workload | engine | output tok/s | total tok/s | req/s | peak RSS MB | pagellm / engine | "
              "% of bound |", "|---|---|---|---|---|---|---|---|"]
    lines += _throughput_rows("throughput_gpt2_fp32", "GPT-2 124M fp32 (dummy)", p32)
    lines += _throughput_rows("throughput_gpt2_fp32_kvbf16", "GPT-2 124M fp32, bf16 KV", None)
    lines += _throughput_rows("throughput_gpt2_bf16", "GPT-2 124M bf16 (dummy)", p16)
    lines += _throughput_rows("throughput_gpt2_int8", "GPT-2 124M bf16, int8 weights", None)
    lines += _throughput_rows("throughput_gpt2_fp8kv", "GPT-2 124M bf16, fp8 KV", None)
    lines += _throughput_rows("throughput_gpt2_lowp", "GPT-2 124M bf16 beside low-precision variants", None)
    lines += _throughput_rows("throughput_llama_fp32", "LLaMA ~100M fp32 (dummy)", None)
    lines += _throughput_rows("throughput_demo", "demo model (shipped)", None)
    lines += _throughput_rows("throughput_demo_json50", "demo model, 50% JSON-constrained", None)
    lines += _throughput_rows("throughput_gpt2_tp2", "GPT-2 124M fp32, tensor parallel 2 on 2 cores", None)
    # Written on a GPU machine (not part of RUNS): see benchmarks/README.md.
    lines += _throughput_rows("throughput_gpt2_fp32_cuda", "GPT-2 124M fp32 (dummy) on {device}", None)
    lat = _load("latency_gpt2")
    if lat:
        lines += ["", f"Latency, GPT-2 124M fp32, batch {lat['batch_size']} x ({lat['input_len']} in, "
                  f"{lat['output_len']} out): prefill median {1000 * lat['prefill_s']['median']:.0f} ms "
                  f"(p90 {1000 * lat['prefill_s']['p90']:.0f}), decode step median "
                  f"{1000 * lat['decode_step_s']['median']:.1f} ms (p90 {1000 * lat['decode_step_s']['p90']:.1f})."]
    kv = _load("kv_demo")
    if kv:
        lines += _kv_table(f"KV cache under a fixed budget of {kv['kv_tokens']} token slots (demo model):", kv["runs"])
    kv8 = _load("kv_demo_fp8")
    if kv8:
        lines += _kv_table(f"The same memory ({kv8['kv_tokens']} bf16 token slots) as a bf16 and as an fp8 cache "
                           "(demo model, bf16 compute):", [r for r in kv8["runs"] if r["name"].startswith("pagellm")])
    lines += _quality_rows()
    sh = _load("sharing_demo")
    if sh:
        lines += ["", "Memory sharing (demo model; saving = 1 - physical / logical blocks):", "",
                  "| kind | width | mean saving | peak saving | peak blocks (shared / unshared) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['kind']} | {r['width']} | {100 * r['mean_saving']:.1f}% | {100 * r['peak_saving']:.1f}% | "
                  f"{r['peak_physical_blocks']} / {r['peak_logical_blocks']} |" for r in sh["sharing"]]
        pc = sh["prefix_caching"]
        lines += ["", f"Prefix caching, {pc['requests']} requests sharing a {pc['system_tokens']}-token system "
                  f"prompt: prefill tokens {pc['off']['prefill_tokens']} -> {pc['on']['prefill_tokens']} "
                  f"({100 * pc['prefill_tokens_saved']:.1f}% saved), median TTFT "
                  f"{1000 * pc['off']['median_ttft_s']:.1f} -> {1000 * pc['on']['median_ttft_s']:.1f} ms "
                  f"({pc['ttft_speedup']:.2f}x)."]
    sv = _load("serve_demo")
    if sv:
        lines += ["", f"Serving (demo model, {sv['completed']} requests at 8/s through `pagellm serve`): "
                  f"{sv['output_token_throughput']:.0f} output tok/s, TTFT median {1000 * sv['ttft_s']['median']:.0f} "
                  f"ms (p99 {1000 * sv['ttft_s']['p99']:.0f}), TPOT median {1000 * sv['tpot_s']['median']:.1f} ms "
                  f"(p99 {1000 * sv['tpot_s']['p99']:.1f})."]
    plots = make_plots()
    if plots:
        lines += ["", *plots]
    return "\n".join(lines)


def write_readme(table: str) -> None:
    with open(README) as f:
        text = f.read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(README, "w") as f:
        f.write(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="Only re-render from existing results.")
    parser.add_argument("--only", nargs="*", help=f"Run only these: {', '.join([*RUNS, *SERVED])}")
    ns = parser.parse_args()
    if not ns.render:
        run_all(ns.only)
    write_readme(render())
    print(f"wrote {README}")


if __name__ == "__main__":
    main()
