"""`pagellm bench ...` subcommands."""

from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="Benchmarks: throughput, latency, serve, kv.",
                           description="Benchmarks that print ratios measured side by side in one run.")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    from pagellm.benchmarks import throughput

    p = bsub.add_parser("throughput", help="Offline throughput, optionally vs Hugging Face transformers.",
                        description=throughput.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_args(p)
    p.set_defaults(func=lambda ns: throughput.main(ns))
