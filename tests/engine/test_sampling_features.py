"""SamplingParams end to end: stop strings, logprobs vs HF, prompt logprobs, seeds, n, chat."""

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import RequestOutputKind
from tests.conftest import DEMO_MODEL
from tests.hf_reference import hf_greedy, hf_prompt_logprobs


@pytest.fixture(scope="module")
def demo():
    return LLM(DEMO_MODEL, num_gpu_blocks_override=256)


def greedy_text(llm, prompt, n=40):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)[0]


def test_multi_token_stop_string_is_cut_and_reported(demo):
    full = greedy_text(demo, "ROMEO.").outputs[0].text
    stop = full[10:22]  # spans several tokens
    assert len(demo.get_tokenizer().encode(stop)) > 1
    out = demo.generate("ROMEO.", SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == full[:full.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    kept = demo.generate("ROMEO.", SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                  include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == full[:full.index(stop) + len(stop)]
    assert demo.llm_engine.scheduler.kv.num_free_blocks == demo.llm_engine.num_blocks


def test_stop_at_the_very_first_token(demo):
    full = greedy_text(demo, "KING.").outputs[0].text
    out = demo.generate("KING.", SamplingParams(temperature=0, max_tokens=40, stop=[full[:1]]), use_tqdm=False)[0]
    assert out.outputs[0].text == "" and out.outputs[0].finish_reason == "stop"
    assert len(out.outputs[0].token_ids) == 1


def test_earliest_of_several_stop_strings_wins(demo):
    full = greedy_text(demo, "ROMEO.").outputs[0].text
    late, early = full[25:30], full[12:15]
    out = demo.generate("ROMEO.", SamplingParams(temperature=0, max_tokens=40, stop=[late, early]), use_tqdm=False)[0]
    assert out.outputs[0].text == full[:full.index(early)] and out.outputs[0].stop_reason == early


@pytest.mark.parametrize("stop", ["東京", "🙂", "é", "京と北"])
@pytest.mark.parametrize("include", [False, True])
def test_unicode_stop_strings_spanning_byte_tokens(llama_path, stop, include):
    from transformers import AutoTokenizer

    from pagellm.core.sched_output import RequestUpdate, SampleResult, SeqDelta
    from pagellm.engine.output_processor import OutputProcessor

    tok = AutoTokenizer.from_pretrained(llama_path)
    text = "ab 東京と北京市 café 🙂 end"
    ids = tok.encode(text, add_special_tokens=False)
    op = OutputProcessor(tok)
    op.add_request("r", None, [5], SamplingParams(stop=[stop], include_stop_str_in_output=include), 0.0)
    stopped = []
    outs = []
    for t in ids:
        outs += op.process([RequestUpdate("r", [SeqDelta(0, [t], [SampleResult(t, -1.0)])], False)],
                           lambda rid, idx, s: stopped.append(s) or True)
        if stopped:
            break
    final = outs[-1].outputs[0]
    cut = text.index(stop) + (len(stop) if include else 0)
    assert stopped == [stop] and final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == text[:cut]


def test_logprobs_top_k_match_hf(demo):
    tok = demo.get_tokenizer()
    ids = tok.encode("MACBETH.\nIs this a dagger")
    out = demo.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8, logprobs=5,
                                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    from tests.hf_reference import hf_model

    model = hf_model(DEMO_MODEL)
    seq = ids + out.token_ids
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    for i, (entry, tok_id) in enumerate(zip(out.logprobs, out.token_ids)):
        ref = lp[len(ids) - 1 + i]
        top = ref.topk(5)
        assert len(entry) == 5  # the chosen (greedy) token is the top-1
        assert list(entry)[:5] == top.indices.tolist()
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[t].logprob == pytest.approx(v, abs=2e-4)
        assert entry[tok_id].rank == 1
        assert entry[tok_id].decoded_token == tok.decode([tok_id])


def test_prompt_logprobs_match_hf_forward(demo):
    tok = demo.get_tokenizer()
    ids = tok.encode("HAMLET.\nAlas, poor Yorick! I knew him, Horatio")
    out = demo.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                        use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    ref = hf_prompt_logprobs(DEMO_MODEL, ids)
    got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
    assert got == pytest.approx(ref, abs=2e-4)


def test_prompt_logprobs_survive_chunked_prefill(llama_path):
    ids = list(range(10, 80))
    llm = LLM(llama_path, max_num_batched_tokens=16)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
    assert got == pytest.approx(hf_prompt_logprobs(llama_path, ids), abs=2e-4)


def test_min_tokens_suppresses_eos(demo):
    eos = demo.get_tokenizer().eos_token_id
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=30, logit_bias={eos: 50.0})
    out = demo.generate("ROMEO.", params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 30 and eos not in out.token_ids
    stops = demo.generate("ROMEO.", SamplingParams(temperature=0, max_tokens=30, logit_bias={eos: 50.0}),
                          use_tqdm=False)[0].outputs[0]
    assert stops.token_ids == [eos] and stops.finish_reason == "stop" and stops.stop_reason is None


def test_seeded_request_is_reproducible_and_n_children_equal_separate_seeds(demo):
    p = SamplingParams(temperature=1.0, seed=5, max_tokens=12, n=3, ignore_eos=True)
    a = demo.generate("KING.", p, use_tqdm=False)[0]
    b = demo.generate("KING.", p, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    singles = [demo.generate("KING.", SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids for i in range(3)]
    assert [c.token_ids for c in a.outputs] == singles
    assert len({tuple(s) for s in singles}) > 1


def test_greedy_n_gives_identical_outputs(demo):
    out = demo.generate("ROMEO.", SamplingParams(temperature=0, n=4, max_tokens=10), use_tqdm=False)[0]
    assert len(out.outputs) == 4 and len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]


def test_best_of_returns_the_n_most_likely(demo):
    out = demo.generate("ROMEO.", SamplingParams(temperature=1.0, n=2, best_of=5, seed=3, max_tokens=10,
                                                 ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 2
    all5 = demo.generate("ROMEO.", SamplingParams(temperature=1.0, n=5, seed=3, max_tokens=10, ignore_eos=True),
                         use_tqdm=False)[0]
    best = sorted(all5.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in best]


def test_chat_uses_the_template_and_stops_at_end_of_turn(demo):
    out = demo.chat([{"role": "user", "content": "What say you, my lord?"}],
                    SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0]
    tok = demo.get_tokenizer()
    expected = tok.apply_chat_template([{"role": "user", "content": "What say you, my lord?"}],
                                       add_generation_prompt=True, tokenize=False)
    assert tok.decode(out.prompt_token_ids) == expected
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text.strip()


def test_chat_without_a_template_is_a_clear_error(gpt2_path, tmp_path):
    import shutil

    d = tmp_path / "notemplate"
    shutil.copytree(gpt2_path, d)
    for f in ("chat_template.jinja",):
        (d / f).unlink(missing_ok=True)
    import json

    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(d))
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", use_tqdm=False)
    assert out[0].prompt_token_ids == llm.get_tokenizer().encode("hi")


def test_delta_outputs_concatenate_to_the_final_text(demo):
    engine = demo.llm_engine
    engine.add_request("d", "ROMEO.", SamplingParams(temperature=0, max_tokens=30, stop=["zzzz"],
                                                     output_kind=RequestOutputKind.DELTA))
    pieces, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                pieces.append(c.text)
                tokens += c.token_ids
    full = greedy_text(demo, "ROMEO.", 30).outputs[0]
    assert "".join(pieces) == full.text and tokens == full.token_ids


def test_greedy_demo_parity_sanity(demo):
    tok = demo.get_tokenizer()
    ids = tok.encode("ROMEO.")
    ref, _ = hf_greedy(DEMO_MODEL, ids, 10)
    assert greedy_text(demo, "ROMEO.", 10).outputs[0].token_ids == ref
