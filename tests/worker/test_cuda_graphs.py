"""The GPU step path (one staged input copy; CUDA graphs for decode batches), checked on CPU by emulation and on
a GPU for real.

On CPU, PAGELLM_STAGED_INPUTS=1 sends every step through StepBuffers, and PAGELLM_EMULATE_CUDA_GRAPHS=1 also
"captures" each decode batch size as a closure over the same static buffers and metadata a graph would hold,
so the padding rows (length-0 sequences writing to a scratch block) and the fixed-address inputs run for real.
"""

import functools
import os

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.benchmarks.profile import host_waits
from pagellm.worker.cuda_graphs import capture_sizes
from tests.triton_script import run_script

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "pagellm", "assets", "shakespeare-llama")
PROMPTS = ["To be, or not to be", "My lord,", "What light through yonder window", "Now is the winter",
           "O Romeo", "Friends, Romans, countrymen", "Is this a dagger"]


def run(backend="torch_ref", max_num_seqs=6, **kw):
    """Greedy tokens and their logprobs per prompt, the runner and the LLM."""
    llm = LLM(DEMO, attention_backend=backend, max_num_seqs=max_num_seqs, seed=0, **kw)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    runner = llm.llm_engine.executor.runner
    res = [(o.outputs[0].token_ids, [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
           for o in outs]
    return res, runner, llm


# Different lengths: the decode batch shrinks through sizes that are not on the ladder (padding).
PARAMS = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True, logprobs=1) for i in range(len(PROMPTS))]


@functools.lru_cache(maxsize=1)
def hf_results():
    """The oracle: Hugging Face transformers' greedy continuations of the same prompt ids, and their logprobs."""
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_greedy

    tok = AutoTokenizer.from_pretrained(DEMO)
    return [hf_greedy(DEMO, tok(p)["input_ids"], sp.max_tokens) for p, sp in zip(PROMPTS, PARAMS)]


def assert_same(a, b, tol=1e-4):
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < tol


def test_capture_sizes_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(42) == [1, 2, 4, 8, 16, 24, 32, 40, 42]


def test_staged_inputs_give_hf_tokens(monkeypatch):
    monkeypatch.setenv("PAGELLM_STAGED_INPUTS", "1")
    got, runner, _ = run()
    assert runner.buffers is not None and runner.graphs is None
    assert_same(hf_results(), got)


def test_staged_inputs_under_tensor_parallelism(monkeypatch):
    """On CUDA every tensor-parallel rank builds its inputs through StepBuffers (graphs stay off under TP)."""
    monkeypatch.setenv("PAGELLM_STAGED_INPUTS", "1")  # the spawned ranks inherit it
    llm = LLM(DEMO, tensor_parallel_size=2, seed=0)
    assert llm.llm_engine.executor.driver.runner.buffers is not None  # rank 0, in this process
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], PARAMS[:3], use_tqdm=False)]
    llm.shutdown()
    assert got == [tokens for tokens, _ in hf_results()[:3]]


@pytest.mark.parametrize("backend", ["torch_ref", "cpu_paged"])
def test_emulated_graphs_give_hf_tokens_and_free_every_block(monkeypatch, backend):
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    got, runner, llm = run(backend)
    g = runner.graphs
    assert g is not None and sorted(g.graphs) == [1, 2, 4, 6]
    assert sum(g.replays.values()) > 10 and set(g.replays) >= {2, 4, 6}  # decode steps ran as "graphs", padded
    assert_same(hf_results(), got)
    # The scratch block for padding rows lies past the pool: the scheduler never hands it out.
    stats = llm.llm_engine.get_stats()
    assert runner.kv_caches[0][0].shape[0] == stats.num_total_blocks + 1
    assert stats.num_free_blocks == stats.num_total_blocks


def test_enforce_eager_turns_graphs_off(monkeypatch):
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    _, runner, _ = run(enforce_eager=True)
    assert runner.graphs is None


def test_prompt_logprobs_and_prefill_steps_run_eagerly(monkeypatch):
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    llm = LLM(DEMO, attention_backend="torch_ref", max_num_seqs=4, seed=0)
    runner = llm.llm_engine.executor.runner
    before = sum(runner.graphs.replays.values())
    out = llm.generate(["To be, or not to be"], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)
    assert out[0].prompt_logprobs is not None
    assert sum(runner.graphs.replays.values()) == before  # one prefill step, no decode


TRITON_GRAPH_CHECK = """
import os, sys
sys.path.insert(0, {root!r})
from tests.worker.test_cuda_graphs import run, assert_same, hf_results
os.environ["PAGELLM_EMULATE_CUDA_GRAPHS"] = "1"
got, runner, _ = run("triton_paged", max_num_seqs=4)
assert sum(runner.graphs.replays.values()) > 5, runner.graphs.replays
assert_same(hf_results(), got)
print("ok")
"""


def test_triton_backend_in_the_engine_with_emulated_graphs():
    """The whole engine on the Triton kernels (Triton's interpreter on CPU): fresh prompts and decode through the
    one varlen kernel, decode batches through the fixed metadata a CUDA graph captures; greedy tokens equal
    Hugging Face's, logprobs within 1e-4."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    run_script(TRITON_GRAPH_CHECK)


TRITON_MULTI_STEP_CHECK = """
import os, sys
sys.path.insert(0, {root!r})
from tests.worker.test_cuda_graphs import run, assert_same, hf_results
os.environ["PAGELLM_EMULATE_CUDA_GRAPHS"] = "1"
got, runner, llm = run("triton_paged", max_num_seqs=4, num_scheduler_steps=4, async_scheduling=True)
stats = llm.llm_engine.stats
assert stats.device_steps - stats.num_steps > 10 and sum(runner.graphs.replays.values()) > 10
assert_same(hf_results(), got)
print("ok")
"""


def test_triton_backend_with_multi_step_rounds():
    """Rounds of 4 decode steps on the Triton kernels (interpreted), each step a replay of the emulated graph on
    rewritten static buffers, with async scheduling: greedy tokens equal Hugging Face's."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    run_script(TRITON_MULTI_STEP_CHECK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on a GPU machine)")
def test_multi_step_rounds_equal_hf_on_gpu():
    """Rounds of 4 decode steps with CUDA graphs and async scheduling, float32: HF's greedy tokens and logprobs."""
    got, runner, llm = run("triton_paged", device="cuda", num_scheduler_steps=4)
    stats = llm.llm_engine.stats
    assert stats.device_steps - stats.num_steps > 10 and sum(runner.graphs.replays.values()) > 10
    assert_same(hf_results(), got, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on a GPU machine)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager_on_gpu(dtype):
    """Graphs with async scheduling (the CUDA defaults) against eager steps run one at a time."""
    tol = 1e-4 if dtype == "float32" else 5e-2
    eager, _, _ = run("triton_paged", device="cuda", dtype=dtype, enforce_eager=True, async_scheduling=False)
    graphed, runner, llm = run("triton_paged", device="cuda", dtype=dtype)
    assert runner.graphs is not None and sum(runner.graphs.replays.values()) > 10
    assert llm.llm_engine.stats.overlapped_steps > 10
    if dtype == "float32":
        assert_same(eager, graphed, tol)
        assert_same(hf_results(), graphed, 1e-3)  # Hugging Face on CPU, the same checkpoint
    else:  # bf16: the same kernels in the same order; allow a rare near-tie flip late in a sequence
        agree = sum(a == b for (ta, _), (tb, _) in zip(eager, graphed) for a, b in zip(ta, tb))
        assert agree >= 0.95 * sum(len(t) for t, _ in eager)


def test_engine_start_freezes_long_lived_objects_out_of_the_collector(monkeypatch):
    """After the first start-up the model and the libraries' objects sit in the permanent generation, so full
    collections (frequent at large batches) no longer traverse them; later engines in the process freeze nothing
    more (frozen cyclic garbage is never collected)."""
    import gc

    import pagellm.worker.model_runner as mr

    gc.unfreeze()
    monkeypatch.setattr(mr, "_frozen", False)
    LLM(DEMO, max_num_seqs=2)
    frozen = gc.get_freeze_count()
    assert frozen > 10_000
    LLM(DEMO, max_num_seqs=2)
    assert gc.get_freeze_count() <= frozen  # nothing more frozen (frozen objects whose last reference goes are freed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronization needs a CUDA GPU")
def test_decode_steps_never_make_the_host_wait_for_the_gpu():
    """With async scheduling and graphs (the CUDA defaults), steady decode steps, penalized rows included, run no
    operation that blocks the host on the GPU (a blocking copy, .item(), .tolist() of a GPU tensor); the only wait is
    the event of the previous step's results, which torch's sync debugging does not count."""
    llm = LLM(DEMO, device="cuda", max_num_seqs=8, seed=0)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS[:6]):
        engine.add_request(str(i), p, SamplingParams(temperature=0.8, seed=i, max_tokens=60, ignore_eos=True,
                                                     frequency_penalty=0.5 if i % 2 else 0.0, logprobs=i % 3 or None))
    for _ in range(8):  # prompts done, two steps in flight
        engine.step()
    syncs = host_waits(engine, 20)
    assert not syncs, syncs
    assert engine.stats.overlapped_steps > 20 and sum(engine.executor.runner.graphs.replays.values()) >= 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronization needs a CUDA GPU")
def test_multi_step_rounds_never_make_the_host_wait_for_the_gpu():
    """The same for rounds of 4 decode steps (graph replays fed on the device, penalty counts kept there, samples
    copied back once)."""
    llm = LLM(DEMO, device="cuda", max_num_seqs=8, seed=0, num_scheduler_steps=4)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS[:6]):
        engine.add_request(str(i), p, SamplingParams(temperature=0.8 * (i % 2), seed=i, max_tokens=200, ignore_eos=True,
                                                     top_p=0.9, logprobs=i % 3 or None,
                                                     frequency_penalty=0.5 if i % 3 == 1 else 0.0))
    for _ in range(4):
        engine.step()
    syncs = host_waits(engine, 10)
    assert not syncs, syncs
    stats = engine.stats
    assert stats.device_steps - stats.num_steps > 20 and sum(engine.executor.runner.graphs.replays.values()) >= 40
