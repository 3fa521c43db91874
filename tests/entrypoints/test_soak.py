"""A bounded soak: mixed requests, a fifth of them abandoned by their clients mid-flight. Every other
request gets a complete answer, nothing answers 5xx, and every KV block is free at the end.

Slow (minutes): excluded from CI by the `slow` marker; run with `pytest -m slow tests/entrypoints/test_soak.py`.
"""

import asyncio
import json
import random

import httpx
import pytest

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"
NUM_REQUESTS = 1500
CONCURRENCY = 32
ABORT_FRACTION = 0.2


def _request(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(["completion", "chat", "completion_stream", "chat_stream", "parallel"])
    max_tokens = rng.randint(1, 64)
    if kind.startswith("chat"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(["Hail", "What news?"])}],
                "max_tokens": max_tokens, "stream": kind.endswith("stream"), "temperature": rng.random()}
        return "/v1/chat/completions", body
    body = {"model": MODEL, "prompt": rng.choice(["ROMEO.", "KING LEAR.\nWhat", "To be"]) * rng.randint(1, 20),
            "max_tokens": max_tokens, "stream": kind.endswith("stream"), "n": 3 if kind == "parallel" else 1,
            "seed": rng.randint(0, 1000)}
    return "/v1/completions", body


async def _one(client: httpx.AsyncClient, path: str, body: dict) -> str:
    """'ok' when the answer is complete; raises on anything else."""
    if not body["stream"]:
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
        return "ok"
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        finished, done = 0, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert "error" not in data, data
                finished += sum(c.get("finish_reason") is not None for c in data["choices"])
        assert done and finished == body.get("n", 1)
    return "ok"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--async-scheduling"]], ids=["one-step", "async-scheduling"])
def test_soak_with_client_aborts_loses_nothing_and_leaks_no_block(extra):
    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "300", "--max-num-seqs", "24",
                           *extra])
    rng = random.Random(0)
    try:
        async def run() -> dict:
            results = {"ok": 0, "aborted": 0}
            sem = asyncio.Semaphore(CONCURRENCY)
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                async def worker(i: int) -> None:
                    path, body = _request(rng)
                    abort_after = rng.uniform(0.01, 1.0) if rng.random() < ABORT_FRACTION else None
                    async with sem:
                        task = asyncio.create_task(_one(client, path, body))
                        if abort_after is not None:
                            done, _ = await asyncio.wait({task}, timeout=abort_after)
                            if not done:
                                task.cancel()
                                results["aborted"] += 1
                                return
                        results[await task] += 1

                await asyncio.gather(*(worker(i) for i in range(NUM_REQUESTS)))
            return results

        results = asyncio.run(run())
        assert results["ok"] + results["aborted"] == NUM_REQUESTS and results["aborted"] > 0
        assert server.wait_pool_free(timeout=30)
        assert server.metric("pagellm:num_requests_waiting") == 0
    finally:
        assert server.stop() == 0
