"""BERT (BertModel, BertForSequenceClassification): an encoder-only pooling model with bidirectional attention.

    input_ids -> word_embeddings + position_embeddings[positions] + token_type_embeddings[types] -> LayerNorm
              -> [LayerNorm(x + dense(attention(query(x), key(x), value(x))))       every token sees every token
                  LayerNorm(h + dense(gelu(intermediate(h))))] x L -> hidden (T, hidden)
    classify: classifier(tanh(pooler.dense(hidden of [CLS])))

Every prompt is computed whole in one step (the scheduler does not chunk prompts for encoder-only models) and
attends over itself only, sequence by sequence; nothing is read from or written to the KV cache, which is
bookkeeping only (one token-sized layer). Token types follow the tokenizer's text pairs: 0 up to and including
the first [SEP], 1 after it (a single text is all 0), as BERT cross-encoders were trained.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry, PoolerConfig
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM
from pagellm.models.layers import activation
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, Linear, RowParallelLinear


class BertSelfAttention(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        e, h = config.hidden_size, config.num_attention_heads
        if h % tp.size:
            raise ValueError(f"{h} attention heads do not split over tensor_parallel_size={tp.size}")
        self.num_heads, self.head_dim = h // tp.size, e // h
        self.query = ColumnParallelLinear.single(e, e, True, tp)
        self.key = ColumnParallelLinear.single(e, e, True, tp)
        self.value = ColumnParallelLinear.single(e, e, True, tp)

    def forward(self, x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(0, 1) for p in (self.query, self.key, self.value))  # (H, T, D)
        out = torch.zeros_like(q)
        for s, e in spans:
            out[:, s:e] = torch.nn.functional.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e])
        return out.transpose(0, 1).reshape(x.shape[0], -1)


class BertAttention(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, tp)
        self.output = nn.Module()
        self.output.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True, tp=tp)
        self.output.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, spans):
        return self.output.LayerNorm(x + self.output.dense(self.self(x, spans)))


class BertLayer(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        e = config.hidden_size
        self.attention = BertAttention(config, tp)
        self.intermediate = nn.Module()
        self.intermediate.dense = ColumnParallelLinear.single(e, config.intermediate_size, True, tp)
        self.output = nn.Module()
        self.output.dense = RowParallelLinear(config.intermediate_size, e, bias=True, tp=tp)
        self.output.LayerNorm = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.act = activation(config.hidden_act)

    def forward(self, x, spans):
        h = self.attention(x, spans)
        return self.output.LayerNorm(h + self.output.dense(self.act(self.intermediate.dense(h))))


class BertModel(CausalLM):
    """Served as a pooling model only (registry: POOLING_MODELS); `pooler_config` is set on the subclass the
    worker builds (`as_pooling_model`)."""

    is_encoder = True  # bidirectional: no chunked prompts, no prefix cache, no KV cache reads
    default_pooling_type = "CLS"  # vLLM's for BERT; sentence-transformers checkpoints say their own
    pooler_config: PoolerConfig

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        return ModelGeometry(num_layers=1, num_kv_heads=1, head_dim=1)  # the KV cache is bookkeeping only

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"BERT with position_embedding_type={config.position_embedding_type!r} is not "
                             "supported (absolute positions only).")
        self.config = config
        self.tp = tp
        e = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, e)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, e)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, e)
        self.embeddings.LayerNorm = nn.LayerNorm(e, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.task = self.pooler_config.task if hasattr(self, "pooler_config") else "embed"
        if self.task == "classify":
            self.pooler = nn.Module()
            self.pooler.dense = Linear(e, e, bias=True)
            self.classifier = Linear(e, len(self.pooler_config.labels), bias=True)
        self.sep_token_id = _sep_token_id(config)

    def hf_name(self, name: str) -> str | None:
        name = name.removeprefix("bert.")
        if name.startswith(("pooler.", "classifier.")) and self.task != "classify":
            return None  # an embedding model pools the encoder's hidden states; BertModel's pooler is not used
        if name.startswith(("cls.", "embeddings.position_ids")):
            return None  # a masked-LM head; a buffer
        return name

    def map_weight(self, name: str):
        renamed = self.hf_name(name)
        return None if renamed is None else (renamed, None)

    def _token_types(self, input_ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        types = torch.zeros_like(input_ids)
        if self.sep_token_id is None or self.config.type_vocab_size < 2:
            return types
        is_sep = (input_ids == self.sep_token_id).long()
        for s, e in spans:  # 1 after the first [SEP] of each sequence
            types[s:e] = ((torch.cumsum(is_sep[s:e], 0) - is_sep[s:e]) > 0).long()
        return types

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        qsl = meta.query_start_loc_cpu
        spans = list(zip(qsl[:-1], qsl[1:]))
        emb = self.embeddings
        x = (emb.word_embeddings(input_ids) + emb.position_embeddings(positions)
             + emb.token_type_embeddings(self._token_types(input_ids, spans)))
        x = emb.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, spans)
        return x

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler.dense(pooled))).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BERT is served as a pooling model (embed / classify), not for generation.")


def _sep_token_id(config) -> int | None:
    """[SEP]: from config.json, else from the tokenizer saved beside the checkpoint (None: no pairs)."""
    sep = getattr(config, "sep_token_id", None)
    if isinstance(sep, int):
        return sep
    path = getattr(config, "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path).sep_token_id
    except (OSError, ValueError):
        return None
