"""What every vision-language model's tests check, against transformers' model on the same checkpoint (the
reference: tests/multimodal/conftest.py): greedy tokens equal and logprobs within 2e-4.

    prompts_with(placeholder)        four prompts: one image, two images, the first's text with another image, text
    against_hf(path, prompts, outs)  each output against transformers' greedy output
    greedy_equals_hf, chat_with_an_image, emulated_graphs, chunks_prefix_hits_and_preemption, tensor_parallel
"""

from __future__ import annotations

import pytest
from multimodal_models import images

from pagellm import LLM, SamplingParams
from tests.multimodal.conftest import hf_vlm_greedy

IMGS = images(4)
N = 10  # tokens each check generates


def prompts_with(placeholder: str) -> list:
    """The prompts every vision-language test runs, with the model's image placeholder."""
    p = placeholder
    return [
        {"prompt": f"The quick {p} brown fox", "multi_modal_data": {"image": IMGS[0]}},
        {"prompt": f"{p}To be{p}, or not to be", "multi_modal_data": {"image": [IMGS[1], IMGS[2]]}},
        {"prompt": f"The quick {p} brown fox", "multi_modal_data": {"image": IMGS[3]}},  # same text, another image
        "Paged attention stores keys",  # text only
    ]


def images_of(prompt) -> list:
    if isinstance(prompt, str):
        return []
    img = prompt["multi_modal_data"]["image"]
    return list(img) if isinstance(img, list) else [img]


def against_hf(path: str, prompts, outs, processor_kwargs: dict | None = None) -> None:
    for p, out in zip(prompts, outs):
        tokens, lps = hf_vlm_greedy(path, list(out.prompt_token_ids), images_of(p), N, processor_kwargs)
        c = out.outputs[0]
        assert list(c.token_ids) == tokens
        got = [entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids)]
        assert got == pytest.approx(lps, abs=2e-4)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N, temperature=0.0, logprobs=0, ignore_eos=True)


def greedy_equals_hf(path: str, prompts, max_model_len: int = 256) -> None:
    """Greedy tokens and logprobs against transformers for prompts 0 and 2 (the same text, other images), 1 (two
    images) and 3 (text only); every block back."""
    llm = LLM(path, max_model_len=max_model_len)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    against_hf(path, prompts, outs)
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids  # the image, not only the text, counts
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks


def chat_with_an_image(path: str) -> tuple[LLM, str]:
    """LLM.chat with an image_pil part and text, against transformers; the engine and the rendered prompt's text."""
    llm = LLM(path, max_model_len=256)
    msg = [{"role": "user", "content": [{"type": "image_pil", "image_pil": IMGS[0]}, {"type": "text", "text": "hi"}]}]
    out = llm.chat(msg, greedy(), use_tqdm=False)[0]
    against_hf(path, [{"multi_modal_data": {"image": IMGS[0]}}], [out])
    assert len(out.outputs[0].token_ids) == N
    return llm, llm.get_tokenizer().decode(out.prompt_token_ids)


def emulated_graphs(path: str, prompts, **kw) -> LLM:
    """The GPU path on CPU (staged inputs, decode steps replayed as graphs, async scheduling) against transformers
    (the caller sets PAGELLM_EMULATE_CUDA_GRAPHS)."""
    llm = LLM(path, max_model_len=256, attention_backend="torch_ref", async_scheduling=True, **kw)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    against_hf(path, prompts, outs)
    assert sum(llm.llm_engine.executor.runner.graphs.replays.values()) > 5
    return llm


def chunks_prefix_hits_and_preemption(path: str, prompts, chunk: int, blocks: int, block_size: int = 4,
                                      max_model_len: int = 256, max_tokens: int = 30,
                                      async_scheduling: bool = False, **engine_kw) -> None:
    """Chunks of `chunk` tokens against transformers; the prompts again (prefix-cache hits, the same tokens); a pool
    of `blocks` blocks that preempts and recomputes, against an engine with room (the same tokens, every block
    back). `engine_kw` go to every engine (a hybrid's mamba_block_size)."""
    llm = LLM(path, max_model_len=max_model_len, max_num_batched_tokens=chunk, max_num_seqs=3, block_size=block_size,
              async_scheduling=async_scheduling, **engine_kw)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    against_hf(path, prompts, outs)
    again = llm.generate(prompts[:2], greedy(), use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in again)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[:2]]
    tight = LLM(path, max_model_len=max_model_len, block_size=block_size, num_gpu_blocks_override=blocks,
                enable_prefix_caching=False, **engine_kw)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    got = tight.generate(prompts * 2, sp, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    ref = LLM(path, max_model_len=max_model_len, block_size=block_size, **engine_kw)
    ref = ref.generate(prompts * 2, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert tight.llm_engine.scheduler.kv.num_free_blocks == tight.llm_engine.num_blocks


def tensor_parallel(path: str, prompts, max_model_len: int = 256) -> None:
    """TP=2 (the vision tower replicated, the language model sharded) against transformers."""
    llm = LLM(path, max_model_len=max_model_len, tensor_parallel_size=2)
    try:
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    against_hf(path, prompts, outs)
