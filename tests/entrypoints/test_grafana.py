"""The Grafana board queries only metrics the server exposes."""

import json
import os
import re

import httpx

from tests.entrypoints.server_utils import RemoteServer

BOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "examples", "grafana", "pagellm.json")


def test_every_metric_the_board_queries_is_in_metrics():
    with open(BOARD) as f:
        board = json.load(f)
    queried = {name for panel in board["panels"] for target in panel["targets"]
               for name in re.findall(r"pagellm:[a-z0-9_]+", target["expr"])}
    assert len(queried) >= 15
    server = RemoteServer(["--num-gpu-blocks-override", "64"])
    try:
        httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO.", "max_tokens": 4}, timeout=60)
        exposed = {line.split("{")[0].split(" ")[0] for line in httpx.get(server.url + "/metrics").text.splitlines()
                   if line and not line.startswith("#")}
    finally:
        server.stop()
    assert queried <= exposed, sorted(queried - exposed)
    assert all(p["gridPos"]["w"] > 0 for p in board["panels"]) and board["uid"] == "pagellm-overview"
