"""`pagellm bench images` runs end to end on the tiny LLaVA, Qwen2-VL, LLaVA-NeXT, Gemma 3 and Mistral 3: both
engines, the ratio, and the same greedy tokens."""

from __future__ import annotations

import json

import pytest

from tests.test_benchmarks import bench


@pytest.mark.parametrize("name", ["llava", "qwen2-vl", "llava-next", "gemma3", "mistral3"])
def test_smoke_bench_images(vlm_models, tmp_path, name):
    out = tmp_path / "images.json"
    text = bench("images", "--model", vlm_models[name], "--num-prompts", "5", "--min-len", "2", "--max-len", "9",
                 "--output-len", "6", "--hf-batch-size", "2", "--rounds", "1", "--output-json", str(out))
    report = json.loads(out.read_text())
    assert "pagellm / transformers" in text and report["speedup"] > 0
    assert report["image_tokens"] > 0 and report["same_tokens"] == 5
