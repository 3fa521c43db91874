"""`pagellm serve` process layout: the engine core in its own process, data-parallel replicas, tensor-parallel and
pipeline-stage workers under the server, and what happens when a worker dies."""

import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"


def children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_engine_core_runs_in_its_own_process_and_a_busy_engine_does_not_stall_health():
    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "512"])
    try:
        cores = [p for p in children(server.proc.pid) if "pagellm.engine.core_main" in " ".join(p.cmdline())]
        assert len(cores) == 1 and cores[0].pid != server.proc.pid
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        busy = threading.Thread(target=lambda: client.completions.create(
            model=MODEL, prompt="ROMEO.", max_tokens=300, n=4, temperature=1.0, extra_body={"ignore_eos": True}))
        busy.start()
        time.sleep(0.3)
        worst = 0.0
        while busy.is_alive():
            start = time.time()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            worst = max(worst, time.time() - start)
            time.sleep(0.02)
        assert worst < 0.5
    finally:
        assert server.stop() == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in cores)


def test_data_parallel_replicas_share_the_load_and_report_per_replica():
    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "256",
                           "--data-parallel-size", "2"])
    try:
        cores = [p for p in children(server.proc.pid) if "pagellm.engine.core_main" in " ".join(p.cmdline())]
        assert len(cores) == 2
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        results = []

        def one(i):
            c = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
            results.append(c.choices[0].text)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        seen_both = False
        while any(t.is_alive() for t in threads):
            text = httpx.get(server.url + "/metrics").text
            running = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("pagellm:replica_num_requests_running{")]
            seen_both |= len(running) == 2 and all(r > 0 for r in running)
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert len(set(results)) == 1 and len(results) == 6  # same greedy text from either replica
        assert seen_both  # both replicas ran requests at once
        assert server.metric("pagellm:kv_cache_total_blocks") == 512  # the sum of two 256-block caches
        assert server.wait_pool_free()
    finally:
        assert server.stop() == 0


def test_tensor_parallel_server_and_a_killed_worker():
    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "256",
                           "--tensor-parallel-size", "2", "--distributed-timeout", "20"])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        ok = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=8, temperature=0)
        assert ok.choices[0].finish_reason == "length"
        workers = [p for p in children(server.proc.pid) if "pagellm.executor.worker_main" in " ".join(p.cmdline())]
        assert len(workers) == 1
        errors = []

        def in_flight():
            try:  # long enough (4 x 480 tokens) to be still running when the worker dies, however fast the step
                client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=480, n=4, temperature=1.0,
                                          extra_body={"ignore_eos": True})
            except openai.APIError as e:
                errors.append(e)

        t = threading.Thread(target=in_flight)
        t.start()
        deadline = time.time() + 10
        while "pagellm:num_requests_running 1.0" not in httpx.get(server.url + "/metrics").text:
            assert time.time() < deadline, "the request never started running"
            time.sleep(0.05)
        os.kill(workers[0].pid, signal.SIGKILL)
        t.join(timeout=30)
        assert not t.is_alive() and errors  # the request failed with an error response, not a hang
        assert isinstance(errors[0], openai.InternalServerError)
        deadline = time.time() + 10
        while httpx.get(server.url + "/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.1)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "rank 1" in health.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=4)
        assert e.value.status_code == 503
    finally:
        server.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children(os.getpid())
                   if "pagellm" in " ".join(p.cmdline()))


def test_pipeline_parallel_server_equals_one_process():
    """`pagellm serve -pp 2`: the demo model's two stages (one worker process beside the engine core) answer a
    completion and a streamed chat as one process does offline."""
    from pagellm import LLM, SamplingParams
    from tests.conftest import DEMO_MODEL

    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "256", "-pp", "2"])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        text = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=16, temperature=0).choices[0].text
        workers = [p for p in children(server.proc.pid) if "pagellm.executor.worker_main" in " ".join(p.cmdline())]
        assert len(workers) == 1
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JULIET."}],
                                                max_tokens=12, temperature=0, stream=True)
        chat = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        server.stop()
    with LLM(DEMO_MODEL, num_gpu_blocks_override=256) as llm:
        ref = llm.generate("ROMEO.", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
        ref_chat = llm.chat([{"role": "user", "content": "JULIET."}], SamplingParams(temperature=0, max_tokens=12),
                            use_tqdm=False)[0].outputs[0].text
    assert text == ref and chat == ref_chat and len(text) > 0
