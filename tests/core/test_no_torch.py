"""core/ is pure Python: the scheduler and the allocator must load and run without torch."""

import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[2] / "pagellm" / "core"


def test_core_sources_never_import_torch():
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("torch", "numpy"), f"{path.name} imports {name}"


def test_importing_core_does_not_load_torch():
    code = ("import sys; import pagellm.core.scheduler, pagellm.core.kv_cache_manager, pagellm.sampling_params; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
