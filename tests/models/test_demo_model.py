"""The shipped demo model: greedy parity with Hugging Face on trained weights (peaked, meaningful logits)."""

import pytest

from pagellm import LLM, SamplingParams
from tests.conftest import DEMO_MODEL
from tests.hf_reference import hf_greedy

PROMPTS = ["ROMEO.", "To be, or not to be, that is", "KING LEAR.\nWhat", "O, she doth teach the torches to burn",
           "First Citizen.\nBefore we proceed any further, hear me speak.", "\n", "MACBETH.\nIs this a dagger",
           "HAMLET.\nAlas, poor Yorick!"]


@pytest.fixture(scope="module")
def demo():
    return LLM(DEMO_MODEL)


def test_greedy_matches_hf_on_the_demo_model(demo):
    tok = demo.get_tokenizer()
    outs = demo.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0),
                         use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ref, ref_lps = hf_greedy(DEMO_MODEL, tok.encode(prompt), 40)
        assert out.outputs[0].token_ids == ref
        lps = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, ref)]
        assert lps == pytest.approx(ref_lps, abs=2e-4)


def test_demo_model_writes_shakespeare_like_text(demo):
    out = demo.generate("ROMEO.", SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0]
    text = out.outputs[0].text
    words = text.split()
    assert len(words) > 10
    assert sum(w.strip(".,;:!?'").lower() in {"the", "and", "i", "my", "of", "to", "a", "king", "lord", "you"}
               for w in words) >= 3
