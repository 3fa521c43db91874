"""`pagellm serve --speculative-config JSON`: the flag takes vLLM's JSON object, completions (plain and streamed)
give the tokens plain decoding gives, and /metrics counts the drafts checked and accepted."""

import json

import httpx
import pytest

from pagellm import LLM, SamplingParams
from tests.entrypoints.server_utils import RemoteServer
from tests.worker.test_cuda_graphs import DEMO

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
DRAFT = {"model": DEMO, "num_speculative_tokens": 3}  # the model as its own draft (method draft_model)


@pytest.mark.parametrize("spec", [SPEC, DRAFT], ids=["ngram", "draft_model"])
def test_speculative_server_matches_plain_decoding_and_reports_acceptance(spec):
    prompts = ["My lord,", "To be, or not to be"]
    llm = LLM(DEMO, num_gpu_blocks_override=128)
    plain = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60),
                                                     use_tqdm=False)]
    server = RemoteServer([DEMO, "--num-gpu-blocks-override", "128", "--speculative-config", json.dumps(spec)])
    try:
        got = []
        for prompt in prompts:
            r = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": DEMO, "prompt": prompt, "max_tokens": 60, "temperature": 0})
            got.append(r.json()["choices"][0]["text"])
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": DEMO, "prompt": prompts[0], "max_tokens": 60, "temperature": 0,
                                "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        drafts = server.metric("pagellm:spec_decode_num_draft_tokens_total")
        kept = server.metric("pagellm:spec_decode_num_accepted_tokens_total")
        assert server.wait_pool_free()
    finally:
        server.stop()
    assert got == plain and streamed == plain[0]
    assert drafts >= kept > 20
    assert len(chunks) < 60  # chunks carry every token a step kept: fewer chunks than tokens


def test_bad_speculative_config_flag_is_a_clear_error():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "serve", DEMO, "--speculative-config",
                          '{"method": "medusa", "num_speculative_tokens": 2}'], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "speculative_config.method must be 'ngram', 'draft_model', 'mtp', 'eagle' or 'eagle3'" in \
        out.stderr + out.stdout
