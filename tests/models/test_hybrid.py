"""Hybrid models (attention and recurrent layers: Granite 4.0-H, Bamba, Qwen3-Next) against transformers, wherever
the engine cuts or moves the work: the recurrent state per sequence must survive prefill chunks, one-token steps,
multi-step decode, batch rows reused by other sequences, preemption, parallel samples, beam search (a fork copies
its parent's state), prefix-cache hits (which resume from checkpoints of the state) and speculative decoding (a
rejected draft's state is put back to the one saved after the last draft kept)."""

from __future__ import annotations

import random

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import BeamSearchParams
from tests.hf_reference import hf_greedy, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)


def prompts(vocab: int, lengths=(1, 4, 13, 30, 47), seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def assert_matches_hf(path, ps, outs, max_tokens=GREEDY.max_tokens):
    for p, out in zip(ps, outs):
        tokens, lps = hf_greedy(path, p, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == tokens, f"prompt of {len(p)} tokens diverged"
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)


def prefix_hits_and_preemption_match_hf(path: str) -> None:
    """Cached prefixes of a 37-token prompt (28, 36 and 16 tokens hit in blocks of 4), then sequences preempted for
    lack of blocks: every output transformers' greedy one."""
    llm = LLM(path, block_size=4, num_gpu_blocks_override=24, max_num_seqs=4)
    base = prompts(512, lengths=(37,), seed=3)[0]
    llm.generate({"prompt_token_ids": base}, SamplingParams(max_tokens=1), use_tqdm=False)
    ps = [base[:30] + [7, 8], base, base[:17]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in ps]
    assert [o.num_cached_tokens for o in outs] == [28, 36, 16]
    ps2 = prompts(512, lengths=(9, 14, 20, 11), seed=8)
    outs2 = llm.generate([{"prompt_token_ids": p} for p in ps2], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, ps + ps2, outs + outs2, max_tokens=24)


@pytest.mark.parametrize("arch, backend, batched, max_seqs", [
    ("granitemoehybrid", "cpu_paged", 5, 2), ("granitemoehybrid", "torch_ref", 13, 3),
    ("granitemoehybrid", "cpu_paged", 2048, 8), ("bamba", "cpu_paged", 5, 2), ("bamba", "torch_ref", 13, 3),
    ("qwen3_next", "cpu_paged", 5, 2), ("qwen3_next", "torch_ref", 13, 3), ("qwen3_5", "cpu_paged", 5, 2),
    ("qwen3_5_moe", "cpu_paged", 13, 3), ("nemotron_h", "cpu_paged", 5, 2), ("nemotron_h", "torch_ref", 13, 3),
    ("lfm2", "cpu_paged", 5, 2), ("falcon_h1", "cpu_paged", 5, 2), ("falcon_h1_nonorm", "torch_ref", 13, 3),
    ("jamba", "cpu_paged", 5, 2), ("jamba", "torch_ref", 13, 3), ("mamba", "cpu_paged", 5, 2),
    ("falcon_mamba", "cpu_paged", 13, 3), ("mamba2", "cpu_paged", 5, 2), ("qwen3_next", "cpu_paged", 2048, 8),
    ("jamba", "cpu_paged", 2048, 8), ("lfm2", "cpu_paged", 2048, 8), ("mamba", "cpu_paged", 2048, 8),
    ("lfm2_moe", "cpu_paged", 5, 2), ("lfm2_moe", "torch_ref", 2048, 8), ("olmo_hybrid", "cpu_paged", 5, 2),
    ("olmo_hybrid_nope", "torch_ref", 13, 3), ("olmo_hybrid", "cpu_paged", 2048, 8), ("minimax", "cpu_paged", 5, 2),
    ("minimax", "torch_ref", 2048, 8), ("kimi_linear", "cpu_paged", 5, 2), ("kimi_linear", "torch_ref", 2048, 8),
    ("bailing_hybrid", "cpu_paged", 13, 3)])
def test_prefill_chunks_and_reused_rows_match_hf(tiny_models, arch, backend, batched, max_seqs):
    """Prompts cut into prefill chunks of 5 or 13 tokens (the convolution and SSM states carry over), two or three
    rows for five prompts (a row's state is zeroed for its next sequence); or all five prompts (1 to 47 tokens) in
    one step, their chunks computed together, padded."""
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, max_num_batched_tokens=batched, max_num_seqs=max_seqs,
              attention_backend=backend)
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    assert_matches_hf(path, ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False))


@pytest.mark.parametrize("arch", ["granitemoehybrid", "qwen3_next", "jamba"])
def test_decoding_rows_in_one_range_or_with_holes_match_hf(tiny_models, arch):
    """Decode steps read the states of rows 0-2 as views (one range) until the middle sequence ends; then rows 0
    and 2 are gathered and written back."""
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256)
    ps = prompts(llm.llm_engine.config.model.vocab_size, lengths=(6, 9, 4), seed=9)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in (16, 3, 16)],
                        use_tqdm=False)
    for p, out, n in zip(ps, outs, (16, 3, 16)):
        assert_matches_hf(path, [p], [out], max_tokens=n)


def test_multi_step_decode_matches_hf(tiny_models):
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, num_scheduler_steps=4)
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    assert_matches_hf(path, ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False))


def test_preempted_sequences_recompute_their_state(tiny_models):
    """Too few KV blocks for every sequence: some are preempted and recomputed from their first token."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=24, max_num_seqs=4)
    ps = prompts(llm.llm_engine.config.model.vocab_size, lengths=(9, 14, 20, 11), seed=8)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, ps, outs, max_tokens=40)


@torch.inference_mode()
def test_parallel_samples_fork_with_a_copy_of_the_prompts_state(tiny_models):
    """n = 3 samples of one prompt: the prompt is computed once (all but its last token) and the samples fork with
    a copy of its state; every sample's logprobs are transformers' on that sample's own tokens, and greedy samples
    are all HF's greedy."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, enable_prefix_caching=False)
    p = prompts(llm.llm_engine.config.model.vocab_size, lengths=(21,))[0]
    before = llm.llm_engine.stats.tokens_computed
    out = llm.generate({"prompt_token_ids": p}, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12,
                                                                ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    # 20 prompt tokens once, then each sample its last prompt token and 11 more
    assert llm.llm_engine.stats.tokens_computed - before == 20 + 3 * 12
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for i, o in enumerate(out.outputs):  # output i is a separate request with seed + i, as for every model
        alone = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12,
                                                                     ignore_eos=True), use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == o.token_ids
    hf = hf_model(path)
    for o in out.outputs:
        logits = hf(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1:-1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(o.token_ids)[:, None])[:, 0].tolist()
        assert [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)] == pytest.approx(want, abs=2e-4)
    greedy = llm.generate({"prompt_token_ids": p}, SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [o.token_ids for o in greedy.outputs] == [hf_greedy(path, p, 12)[0]] * 3


def shared_prefix_prompts(vocab: int, seed: int = 3) -> tuple[list[int], list[list[int]]]:
    """A 37-token prompt, then prompts sharing its first 30 tokens, the whole of it, or its first 17."""
    rng = random.Random(seed)
    base = [rng.randrange(4, vocab) for _ in range(37)]
    return base, [base[:30] + [rng.randrange(4, vocab) for _ in range(k)] for k in (0, 5, 12)] + [base, base[:17]]


@pytest.mark.parametrize("arch, backend, batched", [
    ("granitemoehybrid", "cpu_paged", 5), ("granitemoehybrid", "torch_ref", 2048), ("qwen3_next", "cpu_paged", 13),
    ("qwen3_5", "torch_ref", 5), ("lfm2", "cpu_paged", 7), ("jamba", "cpu_paged", 5), ("falcon_h1", "torch_ref", 5),
    ("nemotron_h", "cpu_paged", 2048), ("mamba", "cpu_paged", 5), ("mamba2", "cpu_paged", 13),
    ("olmo_hybrid", "cpu_paged", 5), ("lfm2_moe", "torch_ref", 13), ("minimax", "cpu_paged", 13),
    ("kimi_linear", "cpu_paged", 13), ("bailing_hybrid", "torch_ref", 5)])
def test_prefix_hits_resume_from_a_state_checkpoint_and_match_hf(tiny_models, arch, backend, batched):
    """Prefix caching: the recurrent state is checkpointed every mamba_block_size (8) tokens, also in the middle of
    a prefill chunk (chunks of 5 or 13); a prompt sharing a cached prefix starts from the last checkpoint within
    its hit (KV blocks of 4 tokens) and still gives HF's tokens and logprobs."""
    path = tiny_models[arch]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, max_num_batched_tokens=batched, mamba_block_size=8,
              attention_backend=backend)
    base, ps = shared_prefix_prompts(llm.llm_engine.config.model.vocab_size)
    llm.generate({"prompt_token_ids": base}, GREEDY, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False)
    # the last checkpoint at or before each hit (a hit leaves the prompt's last token to compute)
    assert [o.num_cached_tokens for o in outs] == [24, 24, 24, 32, 16]
    assert_matches_hf(path, ps, outs)


def test_generated_tokens_are_checkpointed_too(tiny_models):
    """A conversation's next turn (the prompt, the reply, a new message) resumes past the first turn's prompt."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, mamba_block_size=8)
    p = prompts(llm.llm_engine.config.model.vocab_size, lengths=(13,))[0]
    reply = llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    turn = p + list(reply) + [5, 6, 7]  # 36 tokens: the first 32 were computed by the first request (13 + 19)
    out = llm.generate({"prompt_token_ids": turn}, GREEDY, use_tqdm=False)
    assert out[0].num_cached_tokens == 32
    assert_matches_hf(path, [turn], out)


def test_checkpoints_replaced_or_off_fall_back_to_computing(tiny_models):
    """Two checkpoint slots for many prefixes: the least recently used are replaced, and a prompt whose cached KV
    blocks have no checkpoint left is computed from its first token (or from an earlier checkpoint). With prefix
    caching off nothing is checkpointed."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, mamba_block_size=8, num_state_checkpoints=2)
    vocab = llm.llm_engine.config.model.vocab_size
    base, _ = shared_prefix_prompts(vocab)
    one = SamplingParams(max_tokens=1)
    cached = lambda p: llm.generate({"prompt_token_ids": p}, one, use_tqdm=False)[0].num_cached_tokens  # noqa: E731
    assert cached(base) == 0  # checkpoints at 8, 16, 24, 32: the last two stay
    assert cached(base[:27]) == 24
    # 20 tokens of KV blocks cached, no checkpoint within them; its own checkpoints at 8, 16 replace 24, 32
    assert cached(base[:20] + [9]) == 0
    assert cached(base[:27]) == 16
    for p in prompts(vocab, lengths=(17, 18), seed=11):  # their checkpoints at 8 and 16 replace base's
        cached(p)
    out = llm.generate({"prompt_token_ids": base}, GREEDY, use_tqdm=False)
    assert out[0].num_cached_tokens == 0
    assert_matches_hf(path, [base], out)
    off = LLM(path, block_size=4, num_gpu_blocks_override=256, mamba_block_size=8, enable_prefix_caching=False)
    assert off.llm_engine.scheduler.checkpoints is None
    assert off.llm_engine.executor.runner.states[0][0].shape[0] == off.llm_engine.config.scheduler.max_num_seqs
    off.generate({"prompt_token_ids": base}, GREEDY, use_tqdm=False)
    assert off.generate({"prompt_token_ids": base}, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    with pytest.raises(ValueError, match="mamba_block_size .* must be a multiple of block_size"):
        LLM(path, block_size=4, num_gpu_blocks_override=256, mamba_block_size=10)


def test_samples_whose_whole_prompt_is_cached_fork_before_starting_from_the_checkpoint(tiny_models):
    """The cached prefix covers all of the prompt but its last token: the first sample adopts it and waits, the
    others fork from it, and all start from the checkpoint (pinned meanwhile: another prompt's checkpoints in the
    same step may not replace it, with two slots)."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, mamba_block_size=8, num_state_checkpoints=2)
    vocab = llm.llm_engine.config.model.vocab_size
    p, other = prompts(vocab, lengths=(17, 20), seed=12)
    llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=1), use_tqdm=False)  # checkpoints at 8, 16
    outs = llm.generate([{"prompt_token_ids": p}, {"prompt_token_ids": other}],
                        [SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True), GREEDY], use_tqdm=False)
    assert outs[0].num_cached_tokens == 16
    assert [o.token_ids for o in outs[0].outputs] == [hf_greedy(path, p, 12)[0]] * 2
    assert_matches_hf(path, [other], outs[1:])
    assert not llm.llm_engine.scheduler.checkpoints._pins


def test_samples_and_preempted_sequences_resume_from_checkpoints(tiny_models):
    """n = 2 greedy samples of a cached prefix each start from the checkpoint; sequences preempted for lack of
    blocks come back through their own checkpoints; all give HF's tokens."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=24, max_num_seqs=4, mamba_block_size=8)
    vocab = llm.llm_engine.config.model.vocab_size
    p = prompts(vocab, lengths=(21,))[0]
    llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)
    both = llm.generate({"prompt_token_ids": p}, SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    assert both.num_cached_tokens == 16
    assert [o.token_ids for o in both.outputs] == [hf_greedy(path, p, 12)[0]] * 2
    ps = prompts(vocab, lengths=(9, 14, 20, 11), seed=8)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, ps, outs, max_tokens=40)


def test_aborts_free_every_block_and_row(tiny_models):
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=64, max_num_seqs=4, mamba_block_size=8)
    engine = llm.llm_engine
    p = prompts(engine.config.model.vocab_size, lengths=(40,))[0]
    first = llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0]
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": p[:10 + i]}, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request(["r0", "r1", "r2"])
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the worker forgets the aborted sequences
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_total_blocks
    runner = engine.executor.runner
    assert not runner.batch.row_of
    after = llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0]  # rows reused: states zeroed
    assert after.outputs[0].token_ids == first.outputs[0].token_ids


@pytest.mark.parametrize("arch, batched", [("granitemoehybrid", 2048), ("granitemoehybrid", 3), ("qwen3_next", 2048),
                                            ("jamba", 2048), ("mamba", 2048), ("lfm2", 2048)])
def test_beam_search_forks_copy_the_parents_state_and_equal_hf(tiny_models, arch, batched):
    """A beam forked from a computed sequence starts from a copy of its parent's state (attention blocks are shared,
    copy-on-write, as for every model). With 3 tokens a step the beams of width 4 go over two steps: the forks go
    first, and a parent moves on only once its forks have copied its state."""
    from tests.engine.test_memory_sharing import hf_beams

    path = tiny_models[arch]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=400, max_num_batched_tokens=batched)
    eos = set(llm.llm_engine.config.model.eos_token_ids)
    for ids in ([5, 6, 7, 8, 9], prompts(llm.llm_engine.config.model.vocab_size, lengths=(11,), seed=4)[0]):
        for bw, lp, es in [(2, 1.0, False), (4, 0.5, True)]:
            out = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=bw, max_tokens=12,
                                                                                length_penalty=lp, early_stopping=es))
            assert [s.tokens[len(ids):] for s in out[0].sequences] == hf_beams(path, ids, bw, 12, lp, es, eos)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.scheduler.kv.num_total_blocks
    assert not llm.llm_engine.scheduler._state_parents


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


class ForeseeingProposer:
    """Drafts for speculative decoding that are the reference continuation (the tokens HF's greedy decoding, or the
    engine without speculation, gives) with one token in k + 1 drafts changed at a random place: each step keeps
    0 .. k drafts, so every rewind point is exercised (random tiny models rarely repeat their n-grams)."""

    def __init__(self, references: list[list[int]], k: int, vocab: int, seed: int = 0) -> None:
        self.refs, self.k, self.vocab, self.rng = references, k, vocab, random.Random(seed)
        self.kept_at: set[int] = set()  # the change's places (k: none)

    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        tokens = list(tokens)
        for ref in self.refs:
            if len(ref) > len(tokens) and ref[:len(tokens)] == tokens:
                drafts = ref[len(tokens):len(tokens) + min(k, self.k)]
                m = self.rng.randrange(self.k + 1)
                if m < len(drafts):
                    drafts[m] = 4 + (drafts[m] - 3) % (self.vocab - 4)
                self.kept_at.add(min(m, len(drafts)))
                return drafts
        return []

    def forget(self, seq_id: int) -> None:
        pass


def foresee(llm, references: list[list[int]], seed: int = 0) -> ForeseeingProposer:
    sched = llm.llm_engine.scheduler
    sched.proposer = ForeseeingProposer(references, NGRAM["num_speculative_tokens"],
                                        llm.llm_engine.config.model.vocab_size, seed)
    return sched.proposer


def assert_drafts_kept_and_rejected(llm):
    stats = llm.llm_engine.get_stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.llm_engine.scheduler._rewinds


@pytest.mark.parametrize("arch, max_seqs", [("granitemoehybrid", 256), ("granitemoehybrid", 2), ("qwen3_next", 256),
                                             ("qwen3_5", 256), ("jamba", 256), ("nemotron_h", 256), ("lfm2", 256),
                                             ("falcon_h1", 256), ("mamba", 256), ("mamba2", 256), ("lfm2_moe", 256),
                                             ("olmo_hybrid", 256), ("olmo_hybrid_nope", 2), ("minimax", 256),
                                             ("kimi_linear", 256), ("bailing_hybrid", 2)])
def test_speculative_decoding_puts_back_the_state_of_the_last_kept_draft(tiny_models, arch, max_seqs):
    """A speculative step computes the last token and the drafts one after the other through the recurrent layers,
    saving the state after each; when drafts are rejected, the sequence's next step starts from the state after
    the last one kept. Greedy tokens and logprobs equal HF's, whichever draft the first wrong one is (also with
    two rows for five prompts, rows reused)."""
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, max_num_seqs=max_seqs, speculative_config=NGRAM)
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    want = [hf_greedy(path, p, 24) for p in ps]
    proposer = foresee(llm, [p + t for p, (t, _) in zip(ps, want)])
    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0), use_tqdm=False)
    for (tokens, lps), out in zip(want, outs):
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(lps, abs=2e-4)
    assert proposer.kept_at == {0, 1, 2, 3}
    assert_drafts_kept_and_rejected(llm)


def test_speculative_sampling_equals_plain_decoding(tiny_models):
    """Seeded sampling: the same tokens and logprobs as the same engine without speculation; with n = 2 the
    samples fork from the prompt's state and speculate each on its own. Then n-gram drafts, mostly rejected."""
    path = tiny_models["granitemoehybrid"]
    kw = dict(block_size=8, num_gpu_blocks_override=256)
    spec, plain = LLM(path, speculative_config=NGRAM, **kw), LLM(path, **kw)
    ps = prompts(spec.llm_engine.config.model.vocab_size, lengths=(5, 17, 30), seed=5)
    params = [SamplingParams(temperature=t, seed=9, max_tokens=30, ignore_eos=True, logprobs=0, n=n)
              for t, n in ((1.0, 1), (0.5, 2), (0.3, 1))]

    def run(llm):
        return [[(list(o.token_ids), [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)]) for o in r.outputs]
                for r in llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)]

    want = run(plain)
    foresee(spec, [p + t for p, r in zip(ps, want) for t, _ in r])
    ngram = LLM(path, speculative_config=NGRAM, **kw)
    for llm in (spec, ngram):
        for g, w in zip(run(llm), want):
            assert [t for t, _ in g] == [t for t, _ in w]
            for (_, gl), (_, wl) in zip(g, w):
                assert gl == pytest.approx(wl, abs=2e-4)
    assert_drafts_kept_and_rejected(spec)
    assert ngram.llm_engine.get_stats().spec_num_draft_tokens > 0


def test_speculative_steps_checkpoint_and_preempt_safely(tiny_models):
    """With prefix caching, a speculative step checkpoints the state after its last known token only (never after a
    draft); the next turn of a conversation resumes from such a checkpoint. Sequences preempted with a rewind
    pending recompute from their checkpoints. All give HF's tokens."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=24, max_num_seqs=4, mamba_block_size=4,
              speculative_config=NGRAM)
    vocab = llm.llm_engine.config.model.vocab_size
    p = prompts(vocab, lengths=(13,))[0]
    reply = hf_greedy(path, p, 20)[0]
    foresee(llm, [p + reply])
    assert llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reply
    turn = p + reply + [5, 6, 7]  # the first request computed 13 + 19 tokens: a checkpoint at 32
    out = llm.generate({"prompt_token_ids": turn}, GREEDY, use_tqdm=False)
    assert out[0].num_cached_tokens == 32
    assert_matches_hf(path, [turn], out)
    ps = prompts(vocab, lengths=(9, 14, 20, 11), seed=8)
    want = [hf_greedy(path, q, 40) for q in ps]
    foresee(llm, [q + t for q, (t, _) in zip(ps, want)], seed=1)
    outs = llm.generate([{"prompt_token_ids": q} for q in ps],
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [t for t, _ in want]
    assert_drafts_kept_and_rejected(llm)


def test_a_draft_model_speculates_for_a_model_with_recurrent_layers(tiny_models):
    """An attention-only draft model (a random Llama: most of its drafts are rejected) proposes for Granite 4.0-H;
    the output is HF's. A draft model with recurrent layers is refused with the reason."""
    path = tiny_models["granitemoehybrid"]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256,
              speculative_config={"model": tiny_models["llama"], "num_speculative_tokens": 3})
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    assert_matches_hf(path, ps, outs, max_tokens=20)
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert not llm.llm_engine.scheduler._rewinds
    with pytest.raises(ValueError, match="keeps a recurrent state per sequence"):
        LLM(tiny_models["llama"], num_gpu_blocks_override=64,
            speculative_config={"model": path, "num_speculative_tokens": 2})


def test_server_serves_beam_search_and_parallel_samples(tiny_models):
    import httpx

    from tests.engine.test_memory_sharing import hf_beams
    from tests.entrypoints.server_utils import RemoteServer

    path = tiny_models["granitemoehybrid"]
    server = RemoteServer([path, "--served-model-name", "hybrid", "--num-gpu-blocks-override", "128"])
    try:
        body = {"model": "hybrid", "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        r = httpx.post(server.url + "/v1/completions", json={**body, "n": 2, "use_beam_search": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert [c["token_ids"] for c in r.json()["choices"]] == hf_beams(path, [5, 6, 7, 8], 2, 6, 1.0, False, set())
        r = httpx.post(server.url + "/v1/completions", json={**body, "n": 2}, timeout=60)
        assert r.status_code == 200 and [c["token_ids"] for c in r.json()["choices"]] == [
            hf_greedy(path, [5, 6, 7, 8], 6)[0]] * 2
    finally:
        server.stop()


def test_a_model_without_attention_runs_on_a_bookkeeping_kv_cache(tiny_models):
    """Mamba has no attention layer: no KV tensors at all, the block count sized from max_num_seqs and
    max_model_len (nothing to fit in memory); it still generates HF's tokens, preempting and resuming included."""
    path = tiny_models["mamba"]
    llm = LLM(path, max_num_seqs=4, max_model_len=128)
    engine = llm.llm_engine
    assert engine.executor.runner.kv_caches == []
    assert engine.num_blocks == 4 * 128 // engine.config.cache.block_size
    ps = prompts(engine.config.model.vocab_size, lengths=(3, 17, 30))
    assert_matches_hf(path, ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False))


def test_olmo_hybrid_loads_transformers_names_too(tiny_models, tmp_path):
    """OLMo Hybrid's released checkpoints name the layer norms attention_layer_norm / feedforward_layer_norm and
    split the convolution into q_conv1d / k_conv1d / v_conv1d (the fixture, as transformers saves it); a checkpoint
    saved with transformers' module names (input_layernorm, one conv1d) gives the same model."""
    import shutil

    from safetensors.torch import save_file

    src = tiny_models["olmo_hybrid_nope"]
    hf = hf_model(src)
    path = tmp_path / "native_names"
    shutil.copytree(src, path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert any(k.endswith("linear_attn.conv1d.weight") for k in state)
    assert any(k.endswith("input_layernorm.weight") for k in state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    ps = prompts(512, lengths=(6, 19))
    outs = [LLM(p, block_size=8, num_gpu_blocks_override=64).generate([{"prompt_token_ids": q} for q in ps], GREEDY,
                                                                      use_tqdm=False) for p in (src, str(path))]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]
    assert_matches_hf(src, ps, outs[1])
