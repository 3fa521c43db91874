"""The live dashboard of `pagellm serve`: one static page and the JSON it polls once a second.

    GET /dashboard          the page (plain HTML, CSS and JavaScript from dashboard_static/, no build step)
    GET /dashboard/state    what the page draws, taken from the engine cores between steps:
        replicas[i].block_map   one character per KV block: 0 free, 1 used, 2 shared (forks, beams,
                                a prefix held by several sequences), 3 free but holding a cached prefix
        requests                running, then waiting requests: tokens so far, sequences, blocks held
        stats / counters        the scheduler's gauges and counters (the same numbers as /metrics)
        latency                 TTFT and inter-token latency percentiles over the last minute

Access: with --api-key the dashboard needs the key like the API routes (the page passes `?key=` on to
its state requests); --dashboard-public opens it to anyone who can reach the server.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from pagellm.entrypoints.openai.serving_common import ServingState

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_static")
BLOCK_KINDS = {"0": "free", "1": "used", "2": "shared", "3": "cached"}


async def dashboard_state(state: ServingState) -> dict:
    engine = state.engine
    snaps = await engine.snapshot()
    replicas, requests, kinds = [], [], Counter()
    for r, snap in zip(engine.replicas, snaps):
        block_map = "".join(map(str, snap.block_map)) if snap is not None else ""
        kinds.update(block_map)
        replicas.append({"index": r.index, "dead": r.dead, "num_blocks": r.num_blocks, "block_map": block_map})
        for row in snap.requests if snap is not None else []:
            requests.append({**row, "replica": r.index})
    stats = engine.stats
    hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else None
    return {
        "time": time.time(),
        "model": state.model_name,
        "replicas": replicas,
        "blocks": {name: kinds.get(code, 0) for code, name in BLOCK_KINDS.items()},
        "requests": requests,
        "stats": {**asdict(stats), "prefix_cache_hit_rate": hit_rate},
        "counters": asdict(engine.counters),
        "latency": {"ttft": state.metrics.recent_ttft.percentiles(), "itl": state.metrics.recent_itl.percentiles()},
        "dead": engine.dead,
    }


def add_dashboard(app: FastAPI, state: ServingState) -> None:
    @app.get("/dashboard", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = os.path.join(STATIC, os.path.basename(name))
        if not os.path.isfile(path):
            return JSONResponse({"error": {"message": "not found", "type": "invalid_request_error", "param": None,
                                           "code": "not_found"}}, status_code=404)
        return FileResponse(path)

    @app.get("/dashboard/state", include_in_schema=False)
    async def dashboard_state_route() -> JSONResponse:
        return JSONResponse(await dashboard_state(state))
