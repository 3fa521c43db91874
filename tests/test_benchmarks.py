"""Benchmark building blocks (workloads, metrics, simulations) and a smoke run of every `pagellm bench` subcommand."""

import json
import os
import subprocess
import sys

import pytest

from pagellm.benchmarks.kv import simulate_contiguous
from pagellm.benchmarks.latency import percentile
from pagellm.benchmarks.peak import ModelShape, workload_bound
from pagellm.benchmarks.serve import RequestRecord, compute_metrics, poisson_arrivals
from pagellm.benchmarks.workload import WorkloadSpec, dataset_workload, synthetic_workload, workload_totals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_workload_is_seeded_and_within_bounds():
    spec = WorkloadSpec()
    a = synthetic_workload(spec, 50257, {50256})
    b = synthetic_workload(spec, 50257, {50256})
    assert a == b and len(a) == 64
    assert a != synthetic_workload(WorkloadSpec(seed=1), 50257, {50256})
    assert all(16 <= len(r.prompt_token_ids) <= 512 and 8 <= r.output_len <= 256 for r in a)
    assert all(50256 not in r.prompt_token_ids for r in a)
    p, o = workload_totals(a)
    assert 8000 < p < 16000 and 5000 < o < 10000  # medians 160 / 100, sigma 0.6


def test_synthetic_workload_respects_max_model_len():
    reqs = synthetic_workload(WorkloadSpec(num_requests=200), 100, set(), max_model_len=300)
    assert all(len(r.prompt_token_ids) + r.output_len <= 300 for r in reqs)


def test_dataset_workload(tmp_path, llama_path):
    from transformers import AutoTokenizer

    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hello there", "output_len": 7}\n{"prompt": "general kenobi"}\n')
    tok = AutoTokenizer.from_pretrained(llama_path)
    reqs = dataset_workload(str(f), tok, None, 5)
    assert [r.output_len for r in reqs] == [7, 5] and reqs[0].prompt_token_ids == tok.encode("hello there")
    f.write_text('["not", "an object"]\n')
    with pytest.raises(ValueError, match="must be an object"):
        dataset_workload(str(f), tok, None, 5)


def test_serving_metrics_on_synthetic_timestamps():
    a = RequestRecord(start=0.0, chunk_times=[0.5, 0.6, 0.8, 1.0], end=1.0, output_tokens=4, ok=True)
    b = RequestRecord(start=1.0, chunk_times=[1.2, 1.3], end=1.3, output_tokens=2, ok=True)
    c = RequestRecord(start=2.0, ok=False, error="boom")
    assert a.ttft == 0.5 and a.latency == 1.0
    assert a.tpot == pytest.approx((1.0 - 0.5) / 3)
    assert a.itls == pytest.approx([0.1, 0.2, 0.2])
    m = compute_metrics([a, b, c], duration=2.0, slo={"ttft": 300})
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["request_throughput"] == 1.0 and m["output_token_throughput"] == 3.0
    assert m["ttft_s"]["mean"] == pytest.approx(0.35) and m["ttft_s"]["median"] == pytest.approx(0.35)
    assert m["itl_s"]["median"] == pytest.approx(0.15)  # [0.1, 0.2, 0.2] and [0.1]
    assert m["tpot_s"]["mean"] == pytest.approx((1 / 6 + 0.1) / 2)
    assert m["goodput"] == 0.5  # only b has TTFT <= 300 ms


def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 90) == pytest.approx(3.7)


def test_poisson_arrivals():
    assert poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    t = poisson_arrivals(2000, 4.0, 0)
    assert t == sorted(t) and t == poisson_arrivals(2000, 4.0, 0)
    assert 1 / 4.6 < t[-1] / 1999 < 1 / 3.5


def test_contiguous_allocator_simulation():
    # budget 10 slots, reservations of 6: one request at a time.
    run = simulate_contiguous([2, 2], [2, 2], budget=10, reserve=[6, 6], name="c")
    assert run.max_running == 1 and run.steps == 4
    assert run.mean_utilization == pytest.approx((3 / 6 + 4 / 6 + 3 / 6 + 4 / 6) / 4)


def test_workload_bound_counts_flops_and_bytes():
    shape = ModelShape(layers=1, hidden=2, kv_dim=2, non_embedding_params=10, lm_head_params=5)
    b = workload_bound(shape, [2], [2], gflops=1e-9, gbs=1e-9, elem_bytes=1, kv_elem_bytes=1)
    # flops: 2*10*(2+2) + 2*5*2 + 4*1*2*(prompt 1+2 + decode contexts 2+3) = 80 + 20 + 64
    assert b["flops"] == 164
    # bytes: 2 steps * 15 weights + (contexts 2 + 3) * 2 (K and V) * 1 layer * 2
    assert b["bytes"] == 30 + 20
    assert b["seconds"] == pytest.approx(214) and b["output_tokens_per_s"] == pytest.approx(2 / 214)


def bench(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "bench", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_smoke_throughput_with_hf(llama_path, tmp_path):
    out = tmp_path / "t.json"
    text = bench("throughput", "--model", llama_path, "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                 "--compare", "hf", "--hf-single-requests", "1", "--output-json", str(out),
                 "--plot", str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio pagellm / hf-static(16)" in text
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["results"]] == ["pagellm", "hf-static(16)", "hf-single"]
    assert report["workload"]["output_tokens"] == 12


def test_smoke_throughput_variants_and_int8_bound(llama_path, tmp_path):
    out = tmp_path / "v.json"
    text = bench("throughput", "--model", llama_path, "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                 "--quantization", "int8", "--bound", "--variant", "quantization=none,kv_cache_dtype=fp8",
                 "--variant", "async_scheduling=true", "--output-json", str(out))
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["results"]] == ["pagellm", "pagellm[quantization=none,kv_cache_dtype=fp8]",
                                                        "pagellm[async_scheduling=true]"]
    assert "steps overlapped (async scheduling)" in report["results"][2]["note"]
    assert "overlapped" not in report["results"][0]["note"]
    assert report["quantization"] == "int8" and report["bound"]["output_tokens_per_s"] > 0
    assert "int8 weights" in text and "ratio pagellm / pagellm[quantization=none,kv_cache_dtype=fp8]" in text


def test_variant_values():
    from pagellm.benchmarks.throughput import parse_variant

    assert parse_variant("async_scheduling=false,quantization=none,max_num_seqs=64,dtype=bfloat16") == {
        "async_scheduling": False, "quantization": None, "max_num_seqs": 64, "dtype": "bfloat16"}
    assert parse_variant("enforce-eager=True") == {"enforce_eager": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_variant("no_such_flag=1")


def test_smoke_quality(tmp_path):
    out = tmp_path / "q.json"
    text = bench("quality", "--quantization", "int8", "--num-prompts", "2", "--prompt-len", "16", "--max-tokens", "8",
                 "--ppl-window", "64", "--ppl-windows", "2", "--output-json", str(out))
    r = json.loads(out.read_text())
    assert "perplexity" in text and 0 < r["agreement_teacher_forced"] <= 1 and r["perplexity_candidate"] > 1


def test_smoke_latency_kv_sharing_peak(llama_path, tmp_path):
    assert "decode step median" in bench("latency", "--model", llama_path, "--batch-size", "2", "--input-len", "8",
                                         "--output-len", "3", "--num-iters", "1")
    assert "pagellm (block 16, 1024 slots)" in bench("kv", "--model", llama_path, "--num-prompts", "4",
                                                     "--kv-tokens", "1024", "--plot", str(tmp_path / "kv.png"))
    text = bench("kv", "--model", llama_path, "--num-prompts", "4", "--kv-tokens", "512", "--kv-cache-dtype",
                 "bfloat16", "--kv-cache-dtype", "fp8")
    assert "bfloat16, 512 slots" in text and "fp8, 1024 slots" in text  # the same bytes hold twice the tokens
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    text = bench("sharing", "--model", llama_path, "--num-prompts", "2", "--max-tokens", "6",
                 "--prefix-requests", "2", "--system-tokens", "40")
    assert "beam 4" in text and "prefix caching" in text
    assert "workload bound" in bench("peak", "--model", llama_path)


def test_smoke_sleep(llama_path, tmp_path):
    out = tmp_path / "sleep.json"
    text = bench("sleep", "--model", llama_path, "--rounds", "1", "--kv-cache-memory", str(4 << 20),
                 "--output-json", str(out))
    assert "faster than a cold start" in text
    report = json.loads(out.read_text())
    assert set(report["seconds"]) == {"one request", "cold start", "sleep 1 / wake", "sleep 2 / reload",
                                      "update_weights"}
    assert report["bytes_freed"]["level2"] > report["bytes_freed"]["level1"] > 0


def test_nanovllm_workload_preset_is_uniform_in_its_range():
    from pagellm.benchmarks.workload import PRESETS

    reqs = synthetic_workload(PRESETS["nanovllm"], 32000)
    lens = [len(r.prompt_token_ids) for r in reqs]
    outs = [r.output_len for r in reqs]
    assert len(reqs) == 256 and min(lens) >= 100 and max(lens) <= 1024 and min(outs) >= 100 and max(outs) <= 1024
    assert 450 < sum(lens) / len(lens) < 680 and 450 < sum(outs) / len(outs) < 680  # uniform: mean near 562
    with pytest.raises(ValueError, match="distribution"):
        synthetic_workload(WorkloadSpec(distribution="normal"), 100)


def test_attention_sweep_lists_every_launch_setting():
    import argparse

    from pagellm.benchmarks.attention import _sweep

    class Triton:
        tile_n = 32

    ns = argparse.Namespace(tile_n="16,64", num_warps="4", num_stages=None, num_splits=None)
    assert _sweep(Triton(), ns) == [{"tile_n": 16, "num_warps": 4}, {"tile_n": 64, "num_warps": 4}]
    assert _sweep(object(), ns) == [{}]  # a backend without launch settings runs once
    ns = argparse.Namespace(tile_n=None, num_warps=None, num_stages=None, num_splits="1,8")
    assert _sweep(Triton(), ns) == [{"num_splits": 1}, {"num_splits": 8}]


def test_attention_timing_passes_the_split_count_to_the_kernel():
    import torch

    from pagellm.benchmarks.attention import time_backend

    seen = []

    class Backend:
        def attention(self, out, q, cache, meta, params, num_splits=None):
            seen.append(num_splits)

    q = torch.zeros(2, 2, 4)
    time_backend(Backend(), q, None, None, None, "cpu", iters=2, repeats=1, num_splits=16)
    time_backend(Backend(), q, None, None, None, "cpu", iters=1, repeats=1)
    assert seen == [16, 16, 16, None, None]  # warm-up and 2 timed calls, then the backend's own choice


def test_smoke_attention_profile_and_workload_flag(llama_path, tmp_path):
    out = tmp_path / "a.json"
    text = bench("attention", "--backend", "cpu_paged", "--backend", "torch_ref", "--batch-size", "4",
                 "--context-len", "100", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32", "--iters", "2",
                 "--output-json", str(out))
    r = json.loads(out.read_text())
    assert [x["backend"] for x in r["results"]] == ["cpu_paged", "torch_ref"] and r["results"][0]["gbs"] > 0
    assert "% of measured bandwidth" in text
    out = tmp_path / "p.json"
    text = bench("profile", "--model", llama_path, "--batch-size", "3", "--input-len", "8", "--steps", "2",
                 "--warmup-steps", "1", "--async-scheduling", "--output-json", str(out))
    r = json.loads(out.read_text())
    assert r["running"] == 3 and r["wall_ms_per_step"] > 0 and r["busy_ms_per_step"] is None
    assert r["async_scheduling"] is True and r["host_syncs"] is None  # host waits are counted on CUDA only
    assert any(row["name"] == "aten::mm" or "linear" in row["name"] for row in r["top"]), r["top"]
    assert "wall" in text
    assert "workload bound" in bench("peak", "--model", llama_path, "--workload", "nanovllm", "--num-prompts", "4",
                                     "--output-json", str(tmp_path / "peak.json"))
    peak = json.loads((tmp_path / "peak.json").read_text())
    assert peak["workload"] == "nanovllm"


def test_profile_figures_stay_per_decode_step_with_multi_step_rounds(llama_path, tmp_path):
    calls = []
    for steps in (1, 4):
        out = tmp_path / f"p{steps}.json"
        text = bench("profile", "--model", llama_path, "--batch-size", "3", "--input-len", "8", "--steps", "2",
                     "--warmup-steps", "1", "--num-scheduler-steps", str(steps), "--output-json", str(out))
        r = json.loads(out.read_text())
        assert r["device_steps_per_step"] == steps and r["running"] == 3
        assert ("multi-step decode" in text) == (steps > 1)
        calls.append({row["name"]: row["calls_per_step"] for row in r["top"]}["aten::mm"])
    assert calls[1] == calls[0]  # the same matmuls per decode step


def test_compare_layers_script_finds_no_difference_on_cpu(tiny_models):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare_layers.py"), tiny_models["gemma2"]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and any("window" in row for row in rows)  # layers 0-2 (the last is after the final norm)
    assert all(float(row[1]) < 1e-4 and float(row[2]) < 1e-4 for row in rows), r.stdout
    assert r.stdout.count("largest logprob difference") == 2


def test_compare_layers_script_names_the_first_differing_layer(tiny_models, monkeypatch, capsys):
    """A pagellm Gemma 2 without its attention soft-cap differs from HF from the first layer on, in the
    prompt and in the decode step (the script's prompt has distinct tokens, so attention weights matter)."""
    import dataclasses
    import importlib.util

    from pagellm.models.gemma2 import Gemma2ForCausalLM

    options = Gemma2ForCausalLM.attention_options.__func__
    monkeypatch.setattr(Gemma2ForCausalLM, "attention_options", classmethod(
        lambda cls, config: dataclasses.replace(options(cls, config), logits_soft_cap=None)))
    spec = importlib.util.spec_from_file_location("compare_layers", os.path.join(ROOT, "scripts", "compare_layers.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["compare_layers.py", tiny_models["gemma2"]])
    assert script.main() == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0][0] == "0" and float(rows[0][1]) > 1e-2 and float(rows[0][2]) > 1e-2, rows


def test_smoke_serve_against_a_running_server(tmp_path):
    from tests.entrypoints.server_utils import RemoteServer

    server = RemoteServer(["--num-gpu-blocks-override", "256"])
    try:
        out = tmp_path / "s.json"
        text = bench("serve", "--base-url", server.url, "--num-prompts", "4", "--output-len", "5",
                     "--max-input-len", "40", "--request-rate", "20", "--goodput", "ttft:60000",
                     "--output-json", str(out), "--plot", str(tmp_path / "s.png"))
        assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
        assert "TTFT" in text and "ITL" in text
        m = json.loads(out.read_text())
        assert m["completed"] == 4 and m["output_token_throughput"] > 0 and m["goodput"] > 0
    finally:
        server.stop()


def test_smoke_speculative(tmp_path):
    """The demo model's greedy text repeats its lines: drafts are accepted, fewer steps than tokens, same tokens."""
    out = tmp_path / "spec.json"
    text = bench("speculative", "--output-len", "60", "--rounds", "1", "--batch-size", "2", "--output-json", str(out))
    report = json.loads(out.read_text())
    assert "same tokens as plain decoding: yes" in text and report["same_tokens"]
    assert report["output_tokens"] == 120 and report["steps_per_token"]["ngram"] < report["steps_per_token"]["plain"]
    assert 0 < report["acceptance_rate"] <= 1 and report["tokens_per_step_with_drafts"] > 1


def test_smoke_speculative_draft_model(tmp_path):
    """--draft-model: the demo model as its own draft agrees on every greedy token (k + 1 tokens per step)."""
    from tests.worker.test_cuda_graphs import DEMO

    out = tmp_path / "spec.json"
    text = bench("speculative", "--draft-model", DEMO, "--num-speculative-tokens", "3", "--output-len", "40",
                 "--rounds", "1", "--output-json", str(out))
    report = json.loads(out.read_text())
    assert "same tokens as plain decoding: yes" in text and "draft model" in text
    assert report["method"] == "draft_model" and report["acceptance_rate"] == 1.0
    assert report["steps_per_token"]["draft"] <= 0.3


def test_smoke_lora(llama_path, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora.json"
    text = bench("lora", "--model", llama_path, "--rank", "4", "--num-prompts", "3", "--output-len", "4", "--rounds",
                 "1", "--output-json", str(out))
    report = json.loads(out.read_text())
    runs = {"base model, no LoRA engine", "base model, LoRA engine", "one adapter", "2 adapters mixed"}
    assert "2 adapters mixed" in text and set(report["ratio"]) == runs
    assert report["ratio"]["base model, no LoRA engine"] == 1.0 and all(v > 0 for v in report["tok_s"].values())


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_smoke_embed(llama_path, tmp_path, pooling):
    """The causal checkpoint's decoder as an embedding model beside transformers' padded batches: the same
    embeddings (the bench prints the largest difference), with a shared prefix."""
    out = tmp_path / "embed.json"
    text = bench("embed", "--model", llama_path, "--num-prompts", "6", "--min-len", "3", "--max-len", "20",
                 "--prefix-len", "5", "--pooling", pooling, "--hf-batch-size", "4", "--rounds", "1",
                 "--output-json", str(out))
    report = json.loads(out.read_text())
    assert "pagellm / transformers" in text and report["speedup"] > 0
    assert report["max_abs_diff"] < 1e-4 and report["prefix_len"] == 5
