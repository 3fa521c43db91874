"""GEMM rate, memory bandwidth and the throughput bound of the default workload (see pagellm/benchmarks/peak.py).

    python benchmarks/peak.py [--model DIR] [--dtype float32|bfloat16]
"""

import argparse

from pagellm.benchmarks import peak

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=peak.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peak.add_args(parser)
    peak.main(parser.parse_args())
