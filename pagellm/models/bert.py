"""BERT and RoBERTa / XLM-R (BertModel, RobertaModel, XLMRobertaModel and their *ForSequenceClassification):
encoder-only pooling models with bidirectional attention.

    input_ids -> word_embeddings + position_embeddings[positions] + token_type_embeddings[types] -> LayerNorm
              -> [LayerNorm(x + dense(attention(query(x), key(x), value(x))))       every token sees every token
                  LayerNorm(h + dense(gelu(intermediate(h))))] x L -> hidden (T, hidden)
    classify: classifier(tanh(pooler.dense(hidden of [CLS])))      RoBERTa: out_proj(tanh(dense(hidden of <s>)))

RoBERTa differs only around the encoder: positions start after the padding index (pad_token_id + 1 + i, as
transformers numbers the tokens of an unpadded text), token types are all 0, and its classification head has no
pooler. XLM-R (bge-m3, multilingual-e5, bge-reranker-v2-m3) is RoBERTa with another vocabulary.

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
            self._classification_head(e, len(self.pooler_config.labels))
        elif self.task == "token_classify":  # *ForTokenClassification: a linear head on every token, no pooler
            self.classifier = Linear(e, len(self.pooler_config.labels), bias=True)
        self.sep_token_id = _sep_token_id(config)

    def _classification_head(self, hidden: int, num_labels: int) -> None:
        self.pooler = nn.Module()
        self.pooler.dense = Linear(hidden, hidden, bias=True)
        self.classifier = Linear(hidden, num_labels, bias=True)

    @classmethod
    def max_positions(cls, config) -> int:
        """The longest prompt the position table serves."""
        return config.max_position_embeddings

    def hf_name(self, name: str) -> str | None:
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") and self.task != "classify":
            return None  # an embedding model pools the encoder's hidden states; BertModel's pooler is not used
        if name.startswith("classifier.") and self.task not in ("classify", "token_classify"):
            return None
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

    def _positions(self, input_ids: torch.Tensor, positions: torch.Tensor, spans) -> torch.Tensor:
        return positions

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        qsl = meta.query_start_loc_cpu
        spans = list(zip(qsl[:-1], qsl[1:]))
        emb = self.embeddings
        x = (emb.word_embeddings(input_ids) + emb.position_embeddings(self._positions(input_ids, positions, spans))
             + emb.token_type_embeddings(self._token_types(input_ids, spans)))
        x = emb.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, spans)
        return x

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.task == "token_classify":
            return self.classifier(pooled).float()
        return self.classifier(torch.tanh(self.pooler.dense(pooled))).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BERT is served as a pooling model (embed / classify), not for generation.")


class RobertaModel(BertModel):
    """RoBERTa and XLM-R: BERT's encoder; positions after the padding index, no token types, a pooler-less
    classification head (`classifier.dense`, `classifier.out_proj`)."""

    @classmethod
    def max_positions(cls, config) -> int:
        return config.max_position_embeddings - config.pad_token_id - 1

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, max_model_len, tp)
        self.sep_token_id = None  # token types stay 0 (type_vocab_size is 1)
        self.padding_idx = config.pad_token_id

    def _classification_head(self, hidden: int, num_labels: int) -> None:
        self.classifier = nn.Module()
        self.classifier.dense = Linear(hidden, hidden, bias=True)
        self.classifier.out_proj = Linear(hidden, num_labels, bias=True)

    def hf_name(self, name: str) -> str | None:
        if name.startswith("lm_head."):
            return None  # a masked-LM head
        return super().hf_name(name.removeprefix("roberta."))

    def _positions(self, input_ids: torch.Tensor, positions: torch.Tensor, spans) -> torch.Tensor:
        """transformers' numbering: pad + 1 + i for the i-th non-pad token of a sequence, pad for a pad token."""
        real = (input_ids != self.padding_idx).long()
        out = torch.full_like(input_ids, self.padding_idx)
        for s, e in spans:
            out[s:e] = torch.cumsum(real[s:e], 0) * real[s:e] + self.padding_idx
        return out

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.task == "token_classify":
            return self.classifier(pooled).float()
        head = self.classifier
        return head.out_proj(torch.tanh(head.dense(pooled))).float()


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
