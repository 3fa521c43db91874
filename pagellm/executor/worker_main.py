"""Entry point of a tensor-parallel worker process:

    python -m pagellm.executor.worker_main RANK INIT_METHOD      (the pickled EngineConfig on stdin)

A fresh interpreter per worker: nothing of the parent's __main__ is re-imported, so user scripts need
no `if __name__ == "__main__"` guard. The protocol lives in tp_worker.py (imported, never run as
__main__, so its command classes are the ones the driver pickles).
"""

from __future__ import annotations

import logging
import pickle
import sys

from pagellm.executor.tp_worker import run_worker


def main() -> None:
    rank, init_method = int(sys.argv[1]), sys.argv[2]
    config = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s tp{rank} %(name)s: %(message)s")
    run_worker(config, rank, init_method)


if __name__ == "__main__":
    main()
