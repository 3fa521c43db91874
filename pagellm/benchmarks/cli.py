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

    from pagellm.benchmarks import peak

    p = bsub.add_parser("peak", help="GEMM rate, memory bandwidth and the workload's throughput bound.",
                        description=peak.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peak.add_args(p)
    p.set_defaults(func=lambda ns: peak.main(ns))

    from pagellm.benchmarks import sharing

    p = bsub.add_parser("sharing", help="KV blocks saved by sharing (n, best_of, beams) and by prefix caching.",
                        description=sharing.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sharing.add_args(p)
    p.set_defaults(func=lambda ns: sharing.main(ns))
