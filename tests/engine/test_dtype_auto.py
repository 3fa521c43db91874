"""--dtype auto: a 16-bit checkpoint runs in bf16 on a CPU with native bf16 instructions, float32 elsewhere."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pagellm.engine import arg_utils
from pagellm.engine.arg_utils import EngineArgs, _resolve_dtype


@pytest.mark.parametrize("ckpt, device, native, want", [
    ("bfloat16", "cpu", True, "bfloat16"),
    ("float16", "cpu", True, "bfloat16"),
    ("bfloat16", "cpu", False, "float32"),
    ("float16", "cpu", False, "float32"),
    ("float32", "cpu", True, "float32"),
    (None, "cpu", True, "float32"),
    ("float16", "cuda", False, "float16"),
    ("bfloat16", "cuda", False, "bfloat16"),
])
def test_auto_dtype(ckpt, device, native, want):
    assert _resolve_dtype("auto", SimpleNamespace(dtype=ckpt), device, native_bf16=native) == want


def test_explicit_dtype_is_kept_and_unknown_is_an_error():
    assert _resolve_dtype("bfloat16", SimpleNamespace(dtype="float32"), "cpu", native_bf16=False) == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        _resolve_dtype("int4", SimpleNamespace(dtype="float32"), "cpu")


def test_engine_logs_the_choice_for_a_bf16_checkpoint(llama_path, tmp_path, monkeypatch, caplog):
    import json
    import shutil

    ckpt = tmp_path / "bf16"
    shutil.copytree(llama_path, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(arg_utils, "cpu_has_native_bf16", lambda native=native: native)
        with caplog.at_level(logging.INFO, logger="pagellm.engine.arg_utils"):
            config = EngineArgs(model=str(ckpt)).create_engine_config()
        assert config.model.dtype == want
        assert f"bfloat16 checkpoint runs in {want}" in caplog.text
        caplog.clear()
