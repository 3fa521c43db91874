"""Parallel sampling and beam search share KV blocks; prefix caching reuses them; results never change."""

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import BeamSearchParams
from tests.conftest import DEMO_MODEL
from tests.core.helpers import check_block_invariants
from tests.hf_reference import hf_model


def hf_beams(path, ids, bw, max_new, length_penalty, early_stopping, eos_ids):
    model = hf_model(path)
    t = torch.tensor([ids])
    cfg = model.generation_config
    saved = cfg.eos_token_id
    cfg.eos_token_id = sorted(eos_ids) or None
    try:
        g = model.generate(t, attention_mask=torch.ones_like(t), num_beams=bw, do_sample=False,
                           max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=early_stopping,
                           num_return_sequences=bw, pad_token_id=0)
    finally:
        cfg.eos_token_id = saved
    out = []
    for row in g.tolist():
        gen = []
        for tok in row[len(ids):]:
            gen.append(tok)
            if tok in eos_ids:
                break
        out.append(gen)
    return out


@pytest.mark.parametrize("arch", ["demo", "gpt2", "gpt_bigcode", "llama"])
@pytest.mark.parametrize("bw, lp, es", [(2, 1.0, False), (4, 0.5, True), (3, 2.0, "never")])
def test_beam_search_equals_hf(tiny_models, arch, bw, lp, es):
    path = DEMO_MODEL if arch == "demo" else tiny_models[arch]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=400)
    tok = llm.get_tokenizer()
    prompts = ["ROMEO.", "KING LEAR.\nWhat"] if arch == "demo" else ["The quick", "Paged attention"]
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=bw, max_tokens=20, length_penalty=lp,
                                                     early_stopping=es), use_tqdm=False)
    eos = set(llm.llm_engine.config.model.eos_token_ids)
    for p, out in zip(prompts, outs):
        ids = tok.encode(p)
        ref = hf_beams(path, ids, bw, 20, lp, es, eos)
        assert [s.tokens[len(ids):] for s in out.sequences] == ref
        assert all(s.tokens[:len(ids)] == ids and s.text == tok.decode(s.tokens, skip_special_tokens=True)
                   for s in out.sequences)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == 400


def test_beams_share_blocks_and_free_them(llama_path):
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=200)
    engine = llm.llm_engine
    from pagellm.core.beam_search import BeamSearchPolicy

    params = BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True)
    engine.add_request("b", {"prompt_token_ids": list(range(5, 30))}, params.sampling_params(8),
                       policy=BeamSearchPolicy(beam_width=4, num_eos=0))
    shared_seen = False
    while engine.has_unfinished_requests():
        engine.step()
        kv = engine.scheduler.kv
        check_block_invariants(kv)
        shared_seen |= any(b.ref_cnt > 1 for t in kv.tables.values() for b in t)
    assert shared_seen
    assert engine.scheduler.kv.num_free_blocks == 200


def test_beams_honour_bad_words_and_min_tokens():
    llm = LLM(DEMO_MODEL, num_gpu_blocks_override=400)
    tok = llm.get_tokenizer()
    n_prompt = len(tok.encode("ROMEO."))
    base = llm.beam_search("ROMEO.", BeamSearchParams(beam_width=3, max_tokens=16), use_tqdm=False)[0]
    word = tok.decode(base.sequences[0].tokens[n_prompt:]).split()[0]
    banned = llm.beam_search("ROMEO.", BeamSearchParams(beam_width=3, max_tokens=16, bad_words=[word]),
                             use_tqdm=False)[0]
    bad_ids = [tok.encode(w, add_special_tokens=False) for w in (word, " " + word)]
    for s in banned.sequences:
        out = s.tokens[n_prompt:]
        for ids in bad_ids:
            assert not any(out[i:i + len(ids)] == ids for i in range(len(out)))
    chat = "<|user|>\nHail<|end|>\n<|assistant|>\n"
    chat_eos = llm.beam_search(chat, BeamSearchParams(beam_width=2, max_tokens=30, min_tokens=12), use_tqdm=False)[0]
    assert all(len(s.tokens) - len(tok.encode(chat)) > 12 for s in chat_eos.sequences)


def test_parallel_sampling_preempted_group_resumes_identically(llama_path):
    p = SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=20, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + k))} for k in (9, 14, 21)]
    ample = LLM(llama_path, block_size=4, num_gpu_blocks_override=400)
    tight = LLM(llama_path, block_size=4, num_gpu_blocks_override=48)
    a = [[c.token_ids for c in o.outputs] for o in ample.generate(prompts, p, use_tqdm=False)]
    b = [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, p, use_tqdm=False)]
    assert a == b
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.scheduler.kv.num_free_blocks == 48


def test_forked_prompt_is_stored_once(llama_path):
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=400, enable_prefix_caching=False)
    engine = llm.llm_engine
    engine.add_request("n4", {"prompt_token_ids": list(range(5, 45))},
                       SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True))
    engine.step()  # 39 prompt tokens
    engine.step()  # forks + the last prompt token, copy-on-write of the partial block
    kv = engine.scheduler.kv
    logical = sum(len(t) for t in kv.tables.values())
    physical = len({b.block_id for t in kv.tables.values() for b in t})
    assert logical == 4 * 10 and physical == 9 + 4  # 9 shared full prompt blocks + one last block each
    engine.abort_request("n4")
    assert kv.num_free_blocks == 400


def test_prefix_caching_on_and_off_give_identical_outputs(llama_path):
    system = list(range(10, 60))
    prompts = [{"prompt_token_ids": system + [70 + i, 80 + i]} for i in range(6)]
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    on = LLM(llama_path, block_size=4, enable_prefix_caching=True)
    off = LLM(llama_path, block_size=4, enable_prefix_caching=False)
    a = [o.outputs[0].token_ids for o in on.generate(prompts, p, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in off.generate(prompts, p, use_tqdm=False)]
    assert a == b
    stats = on.llm_engine.get_stats()
    assert stats.prefix_cache_hits > 0 and off.llm_engine.get_stats().prefix_cache_hits == 0


def test_second_request_with_a_shared_prefix_computes_fewer_tokens(llama_path):
    llm = LLM(llama_path, block_size=4)
    engine = llm.llm_engine
    shared = list(range(10, 60))
    first = llm.generate({"prompt_token_ids": shared + [5]}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    before = engine.stats.tokens_computed
    second = llm.generate({"prompt_token_ids": shared + [6, 7]}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48  # 12 full blocks of the 50 shared tokens
    assert engine.stats.tokens_computed - before == 52 - 48
    stats = engine.get_stats()
    assert stats.prefix_cache_hits == 48 and stats.prefix_cache_queries == 51 + 52


def test_cached_prefix_blocks_are_evicted_lru_and_reused(llama_path):
    llm = LLM(llama_path, block_size=4, num_gpu_blocks_override=30)
    a = list(range(10, 50))
    llm.generate({"prompt_token_ids": a}, SamplingParams(max_tokens=1), use_tqdm=False)
    # Fill the pool with other prompts: a's blocks get evicted and the pool stays consistent.
    for k in range(5):
        llm.generate({"prompt_token_ids": [100 + k] * 60}, SamplingParams(max_tokens=1), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": a}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert llm.llm_engine.scheduler.kv.pool.num_evictions > 0
