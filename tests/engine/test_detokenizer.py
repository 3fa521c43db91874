"""Incremental detokenization equals decoding the whole sequence; no broken characters mid-stream."""

import random

import pytest
from transformers import AutoTokenizer

from pagellm.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import DEMO_MODEL

TEXTS = ["Hello, world!", "東京と北京市 — café naïve", "emoji 🙂🚀🎉 mixed with text 😀",
         "  leading  and   inner spaces ", "Привет, мир! 안녕하세요", "a\nnew\n\nline"]


@pytest.fixture(scope="module", params=["demo", "tiny"])
def tokenizer(request, llama_path):
    return AutoTokenizer.from_pretrained(DEMO_MODEL if request.param == "demo" else llama_path)


def stream(tok, prompt_ids, ids, **kw):
    d = IncrementalDetokenizer(tok, prompt_ids, **kw)
    pieces = [d.add(t) for t in ids]
    pieces.append(d.finish())
    return pieces, d


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode_and_never_shows_replacement_chars(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, d = stream(tokenizer, tokenizer.encode("Prompt:"), ids)
    assert "".join(pieces) == text == d.text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(20))
def test_random_token_sequences_equal_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]
    prompt = [rng.randrange(len(tokenizer)) for _ in range(5)]
    pieces, d = stream(tokenizer, prompt, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_kept_when_asked(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    pieces, _ = stream(tokenizer, [], ids, skip_special_tokens=False)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)
    assert tokenizer.eos_token in "".join(pieces)


def test_slow_path_offset_method_matches_too(tokenizer):
    class NoBackend:  # hides the fast tokenizer's Rust backend to exercise the generic method
        def __init__(self, tok):
            self._tok = tok

        def decode(self, *a, **k):
            return self._tok.decode(*a, **k)

    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces, _ = stream(NoBackend(tokenizer), [], ids)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
