"""pagellm: high-throughput LLM inference and serving with a paged KV cache.

    from pagellm import LLM, SamplingParams
    llm = LLM("path/to/hf-checkpoint")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

Names are imported lazily so that the torch-free parts (pagellm.core,
pagellm.sampling_params) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagellm.entrypoints.llm",
    "SamplingParams": "pagellm.sampling_params",
    "BeamSearchParams": "pagellm.sampling_params",
    "RequestOutputKind": "pagellm.sampling_params",
    "RequestOutput": "pagellm.outputs",
    "CompletionOutput": "pagellm.outputs",
    "Logprob": "pagellm.outputs",
    "EngineArgs": "pagellm.engine.arg_utils",
    "LLMEngine": "pagellm.engine.llm_engine",
    "AsyncLLMEngine": "pagellm.engine.async_engine",
    "LoRARequest": "pagellm.lora.request",
    "PoolingParams": "pagellm.pooling_params",
    "PoolingRequestOutput": "pagellm.outputs",
    "EmbeddingRequestOutput": "pagellm.outputs",
    "ClassificationRequestOutput": "pagellm.outputs",
    "ScoringRequestOutput": "pagellm.outputs",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from pagellm.engine.arg_utils import EngineArgs  # noqa: F401
    from pagellm.engine.llm_engine import LLMEngine  # noqa: F401
    from pagellm.entrypoints.llm import LLM  # noqa: F401
    from pagellm.lora.request import LoRARequest  # noqa: F401
    from pagellm.outputs import (  # noqa: F401
        ClassificationRequestOutput,
        CompletionOutput,
        EmbeddingRequestOutput,
        Logprob,
        PoolingRequestOutput,
        RequestOutput,
        ScoringRequestOutput,
    )
    from pagellm.pooling_params import PoolingParams  # noqa: F401
    from pagellm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagellm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
