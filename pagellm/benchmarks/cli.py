"""`pagellm bench ...` subcommands: each module exposes `add_args(parser)` and `main(namespace)`."""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "throughput": ("throughput", "Offline throughput, optionally side by side with Hugging Face transformers."),
    "latency": ("latency", "Prefill and decode latency of one batch (median, p90)."),
    "serve": ("serve", "Streaming client for any OpenAI-compatible server: TTFT, TPOT, ITL, goodput."),
    "kv": ("kv", "KV utilization and concurrency vs a contiguous allocator under the same budget."),
    "sharing": ("sharing", "KV blocks saved by forks and beams, and by prefix caching."),
    "peak": ("peak", "GEMM rate, memory bandwidth and the workload's throughput bound."),
    "attention": ("attention", "Paged-attention kernel micro-benchmark: time per call and achieved GB/s."),
    "profile": ("profile", "Where a decode step goes: wall vs device busy time, top kernels / operators."),
    "speculative": ("speculative", "Speculative decoding (n-gram or draft-model drafts) against plain decoding."),
    "embed": ("embed", "Embedding throughput of the pooling runner against transformers on the same prompts."),
    "images": ("images", "Throughput on prompts with images (LLaVA) against transformers on the same requests."),
    "lora": ("lora", "What serving LoRA adapters costs: base model vs one adapter vs mixed adapters."),
    "sleep": ("sleep", "Sleep mode, weight reloads and updates against starting the engine again."),
    "quality": ("quality", "Greedy agreement and perplexity of a quantized / 8-bit-cache run against float32."),
}


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="Benchmarks: " + ", ".join(SUBCOMMANDS) + ".",
                           description="Benchmarks that print ratios measured side by side in one run.")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"pagellm.benchmarks.{module_name}")
        p = bsub.add_parser(name, help=help_text, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(func=module.main)
