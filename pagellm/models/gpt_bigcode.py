"""GPT BigCode (GPTBigCodeForCausalLM, e.g. SantaCoder/StarCoder): GPT-2 with multi-query attention.

Same blocks as gpt2.py; the differences are declared: nn.Linear weights (no
Conv1D transpose) and, with `multi_query`, one K/V head shared by every query
head, so the KV cache holds 1 head instead of n_head (n_head x smaller).
"""

from __future__ import annotations

from pagellm.models.gpt2 import GPT2LMHeadModel


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    transposed = False

    @classmethod
    def kv_heads(cls, config) -> int:
        return 1 if getattr(config, "multi_query", True) else config.n_head
