"""Run a check script in a fresh interpreter, under Triton's CPU interpreter (TRITON_INTERPRET=1) or compiled.

Scripts are format strings: `{root}` is the repository root (put it on sys.path to import the tests);
a script ends by printing "ok".
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, interpret: bool = True, timeout: int = 900, **fields) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", script.format(root=ROOT, **fields)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
