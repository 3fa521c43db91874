"""The /dashboard page in a real browser (headless Chromium driven by Playwright): it updates under traffic, its block
map and counters agree with /metrics, and it needs the API key unless --dashboard-public. A screenshot is saved in
tests/artifacts/ (not committed)."""

import os
import shutil
import threading
import time

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Debian's Chromium, no downloads: Playwright drives it by its path.
LAUNCH = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH)
        yield b
        b.close()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def read(page, element_id: str) -> str:
    return page.get_attribute(f"#{element_id}", "data-value")


def test_dashboard_follows_traffic_and_matches_metrics(browser):
    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "96", "--block-size", "8",
                           "--dashboard-public", "--max-num-seqs", "6"])
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.goto(server.url + "/dashboard")
        page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=15000)
        assert read(page, "blocks-total") == "96" and read(page, "blocks-used") == "0"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                client.completions.create(model=MODEL, prompt="ROMEO. " * 10, max_tokens=120, n=3, temperature=1.0,
                                          extra_body={"ignore_eos": True})

        threads = [threading.Thread(target=traffic) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            # under load: blocks in use, requests listed, and shared blocks (n = 3 forks share the prompt)
            page.wait_for_function("Number(document.getElementById('blocks-used').dataset.value) + "
                                   "Number(document.getElementById('blocks-shared').dataset.value) > 0 && "
                                   "Number(document.getElementById('running').dataset.value) > 0", timeout=30000)
            page.wait_for_function("Number(document.getElementById('blocks-shared').dataset.value) > 0",
                                   timeout=30000)
            assert page.locator("#requests tbody tr").count() > 0
            canvas_map = page.get_attribute("#maps canvas", "data-blocks")
            assert len(canvas_map) == 96 and set(canvas_map) - {"0"}
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.screenshot(path=os.path.join(ARTIFACTS, "dashboard.png"), full_page=True)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert server.wait_pool_free()
        # idle again: the page's numbers and /metrics agree
        before = Number = int(page.get_attribute("body", "data-updates"))
        page.wait_for_function(f"Number(document.body.dataset.updates) >= {Number + 2}", timeout=15000)
        assert int(page.get_attribute("body", "data-updates")) > before
        m = httpx.get(server.url + "/metrics").text
        assert read(page, "running") == "0" and metric(m, "pagellm:num_requests_running") == 0
        free_page = int(read(page, "blocks-free")) + int(read(page, "blocks-cached"))
        assert free_page == metric(m, "pagellm:kv_cache_free_blocks") == 96
        assert int(read(page, "generated")) > 0
        assert int(read(page, "preemptions")) == metric(m, "pagellm:num_preemptions_total")
        hits, queries = metric(m, "pagellm:prefix_cache_hits_total"), metric(m, "pagellm:prefix_cache_queries_total")
        assert float(read(page, "hit-rate")) == pytest.approx(hits / queries)
        assert page.locator("#lat-ttft td").first.inner_text().endswith("ms")
    finally:
        server.stop()


def test_dashboard_needs_the_key_unless_public(browser):
    server = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "64", "--api-key", "sekret"])
    try:
        assert httpx.get(server.url + "/dashboard").status_code == 401
        assert httpx.get(server.url + "/dashboard/state").status_code == 401
        page = browser.new_page()
        page.goto(server.url + "/dashboard?key=sekret")
        page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=15000)
        assert read(page, "blocks-total") == "64"
        assert page.inner_text("#health") == "healthy"
    finally:
        server.stop()
    assert time.time() > 0
