"""Entry point of the engine-core process of `pagellm serve`:

    python -m pagellm.engine.core_main HOST PORT        ((authkey, EngineConfig, log level) pickled on stdin)

A fresh interpreter (nothing of the parent's __main__ is re-imported). It connects back to the API
process, which authenticates it, and runs core_proc.run_engine_core until told to stop.
"""

from __future__ import annotations

import logging
import pickle
import sys

from pagellm.engine.core_proc import connect, run_engine_core


def main() -> None:
    authkey, config, level = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=level, format="%(levelname)s engine-core %(name)s: %(message)s")
    conn = connect((sys.argv[1], int(sys.argv[2])), authkey)
    run_engine_core(config, conn)


if __name__ == "__main__":
    main()
