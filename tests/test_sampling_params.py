"""Every invalid SamplingParams value fails at construction with a ValueError naming the field and the range."""

import pytest

from pagellm.sampling_params import BeamSearchParams, ParamError, SamplingParams

INVALID = [
    (dict(n=0), "n", r"n must be an integer >= 1, got 0"),
    (dict(n=1.5), "n", r"n must be an integer >= 1"),
    (dict(n=3, best_of=2), "best_of", r"best_of must be an integer >= n \(3\), got 2"),
    (dict(presence_penalty=2.5), "presence_penalty", r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), "frequency_penalty", r"frequency_penalty must be in \[-2, 2\]"),
    (dict(repetition_penalty=0), "repetition_penalty", r"repetition_penalty must be > 0"),
    (dict(temperature=-0.5), "temperature", r"temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature", r"temperature must be >= 0"),
    (dict(top_p=0), "top_p", r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), "top_p", r"top_p must be in \(0, 1\]"),
    (dict(top_k=-3), "top_k", r"top_k must be an integer >= 1, or 0 / -1 to disable"),
    (dict(top_k=2.5), "top_k", r"top_k must be an integer"),
    (dict(min_p=-0.1), "min_p", r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.5), "min_p", r"min_p must be in \[0, 1\]"),
    (dict(seed="abc"), "seed", r"seed must be an integer or None"),
    (dict(max_tokens=0), "max_tokens", r"max_tokens must be an integer >= 1, got 0"),
    (dict(min_tokens=-1), "min_tokens", r"min_tokens must be an integer >= 0"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens", r"min_tokens must be <= max_tokens \(4\), got 5"),
    (dict(logprobs=-1), "logprobs", r"logprobs must be an integer >= 0 or None"),
    (dict(prompt_logprobs=-2), "prompt_logprobs", r"prompt_logprobs must be an integer >= 0 or None"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens", r"truncate_prompt_tokens must be an integer >= 1"),
    (dict(stop=["ok", ""]), "stop", r"stop must be a list of non-empty strings"),
    (dict(stop_token_ids=[1, -4]), "stop_token_ids", r"stop_token_ids must be a list of non-negative token ids"),
    (dict(allowed_token_ids=[]), "allowed_token_ids", r"allowed_token_ids must be a non-empty list"),
    (dict(bad_words=["fine", " "]), "bad_words", r"bad_words must be a list of non-empty strings"),
    (dict(logit_bias={"x": 1.0}), "logit_bias", r"logit_bias must be a mapping of token id -> float"),
    (dict(stop=["x"], detokenize=False), "stop", r"stop strings are matched on text"),
]


@pytest.mark.parametrize("kwargs, field, message", INVALID, ids=[f[1] + str(i) for i, f in enumerate(INVALID)])
def test_invalid_value_names_the_field(kwargs, field, message):
    with pytest.raises(ValueError, match=message) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, ParamError) and e.value.param == field


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.skip_special_tokens


def test_greedy_disables_filters_and_a_single_stop_string_becomes_a_list():
    p = SamplingParams(temperature=0, top_k=5, top_p=0.5, stop="END")
    assert (p.top_k, p.top_p) == (0, 1.0) and p.stop == ["END"]


def test_vocab_dependent_checks_happen_in_the_engine(llama_path):
    from pagellm import LLM

    llm = LLM(llama_path)
    v = llm.llm_engine.config.model.vocab_size
    for kwargs, field in [(dict(logit_bias={v: 1.0}), "logit_bias"), (dict(allowed_token_ids=[v + 1]),
                          "allowed_token_ids"), (dict(logprobs=v + 1), "logprobs")]:
        with pytest.raises(ParamError, match=field) as e:
            llm.generate("hi", SamplingParams(**kwargs), use_tqdm=False)
        assert e.value.param == field


@pytest.mark.parametrize("kwargs, match", [(dict(beam_width=0, max_tokens=4), "beam_width"),
                                           (dict(beam_width=2, max_tokens=0), "max_tokens"),
                                           (dict(beam_width=2, max_tokens=4, temperature=0.5), "temperature"),
                                           (dict(beam_width=2, max_tokens=4, early_stopping="sometimes"),
                                            "early_stopping"),
                                           (dict(beam_width=2, max_tokens=4, repetition_penalty=-1),
                                            "repetition_penalty")])
def test_invalid_beam_search_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**kwargs)
