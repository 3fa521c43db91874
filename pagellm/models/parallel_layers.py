"""Layers that know their tensor-parallel rank (Megatron-style), each loading only its own shard.

    ColumnParallelLinear   outputs split over ranks, no communication; several projections of one input
                           packed into one matmul (q/k/v, gate/up), each split on its own
    RowParallelLinear      inputs split over ranks; partial sums all-reduced, then the bias
    VocabParallelEmbedding vocabulary rows split; a rank embeds the ids it holds, zeros elsewhere; all-reduce
    parallel_logits        each rank's vocabulary slice of the logits, gathered on rank 0

An attention block is column (q/k/v) then row (o_proj); an MLP column (gate/up) then row (down): one
all-reduce per block. With a TPGroup of size 1 every layer is the plain one.

Packed q/k/v over tp = 2 ranks, 4 query heads and 1 K/V head of size d (multi-query: the K/V head
is replicated, each rank keeps a copy):

    checkpoint rows   q: [h0 h1 | h2 h3]   k: [kv0]   v: [kv0]
    rank 0 keeps      q: h0 h1             k: kv0     v: kv0      -> local rows [q 2d | k d | v d]
    rank 1 keeps      q: h2 h3             k: kv0     v: kv0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.weight_utils import (
    CheckpointTensor,
    ckpt_full,
    ckpt_narrow,
    ckpt_shape,
    copy_into,
    set_weight_loader,
)

SINGLE = TPGroup()


class Linear(nn.Linear):
    """nn.Linear that, for float32 on CPU and up to TRANSPOSED_MAX_ROWS rows, computes out^T = W x^T + b.

    MKL runs this orientation 1.1-1.7x faster for the few-row inputs of decode steps
    (measured for GPT-2's shapes at 16-256 rows), with bitwise the same result; the output is a
    transposed view, which the next Linear consumes without a copy. Large prefill batches keep
    the usual orientation (slightly faster there).
    """

    TRANSPOSED_MAX_ROWS = 512
    quant_method = None  # set by pagellm.quantization on quantized layers: its apply() does the matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, bias)
        if (x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.shape[0] > self.TRANSPOSED_MAX_ROWS):
            return torch.nn.functional.linear(x, self.weight, bias)
        if bias is None:
            return torch.mm(self.weight, x.t()).t()
        return torch.addmm(bias[:, None], self.weight, x.t()).t()


@dataclass(frozen=True)
class Part:
    """One projection of a column-parallel matmul, as this rank keeps it."""

    full_size: int  # output rows of this projection in the checkpoint
    start: int  # first checkpoint row this rank keeps
    size: int  # rows this rank keeps


def even_part(full_size: int, tp: TPGroup) -> Part:
    start, size = tp.shard(full_size)
    return Part(full_size, start, size)


def parts_loader(parts: list[Part]):
    """A weight loader for a tensor whose rows (dim 0) are several parts one after the other (a convolution over
    packed q | k | v channels, per-head vectors): this rank keeps its rows of each part, in order."""
    def load(param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        have, want = ckpt_shape(tensor)[0], sum(p.full_size for p in parts)
        if have != want:
            raise ValueError(f"checkpoint has {have} rows, the model expects {want}")
        src = dst = 0
        for p in parts:
            copy_into(param[dst:dst + p.size], ckpt_narrow(tensor, 0, src + p.start, p.size))
            src, dst = src + p.full_size, dst + p.size
    return load


def qkv_parts(num_heads: int, num_kv_heads: int, head_dim: int, tp: TPGroup) -> list[Part]:
    """q split by heads; K/V heads split too, or replicated when there are fewer than ranks."""
    if num_heads % tp.size:
        raise ValueError(f"{num_heads} attention heads do not split over tensor_parallel_size={tp.size}")
    q = even_part(num_heads * head_dim, tp)
    if num_kv_heads >= tp.size:
        kv = even_part(num_kv_heads * head_dim, tp)
    else:
        if tp.size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} K/V heads cannot be replicated over tensor_parallel_size={tp.size}")
        head = tp.rank * num_kv_heads // tp.size
        kv = Part(num_kv_heads * head_dim, head * head_dim, head_dim)
    return [q, kv, kv]


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    return max(1, num_kv_heads // tp_size)


class ColumnParallelLinear(Linear):
    """Outputs split over ranks; one matmul for several projections of the same input.

    Checkpoints give the parts one by one (shard i: that part's full rows) or packed in one tensor
    (shard None: Phi-3's qkv_proj, GPT-2's c_attn). `transposed`: the checkpoint stores (in, out).

        parts [q: 8 rows, k: 4, v: 4], tp 2, rank 1 -> local rows q[4:8] | k[2:4] | v[2:4]
    """

    def __init__(self, in_features: int, parts: list[Part], bias: bool, transposed: bool = False) -> None:
        super().__init__(in_features, sum(p.size for p in parts), bias=bias)
        self.parts = parts
        self.transposed = transposed
        self.out_sizes = [p.size for p in parts]
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(parts))]
        self.full_offsets = [sum(p.full_size for p in parts[:i]) for i in range(len(parts))]
        for p in self.parameters(recurse=False):
            set_weight_loader(p, self.load_part, frozenset(range(len(parts))))

    @classmethod
    def single(cls, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE,
               transposed: bool = False) -> ColumnParallelLinear:
        return cls(in_features, [even_part(out_features, tp)], bias, transposed)

    def load_part(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id: int | None = None) -> None:
        self.load_rows(param, tensor, shard_id, out_dim=1 if self.transposed and param.dim() == 2 else 0)

    def load_rows(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id: int | None, out_dim: int) -> None:
        """This rank's output rows of one part (or all parts) of a checkpoint tensor whose outputs run
        along out_dim; the parameter holds outputs along dim 0."""
        have = ckpt_shape(tensor)[out_dim]
        todo = list(enumerate(self.parts)) if shard_id is None else [(shard_id, self.parts[shard_id])]
        want = sum(p.full_size for p in self.parts) if shard_id is None else self.parts[shard_id].full_size
        if have != want:
            raise ValueError(f"checkpoint has {have} output rows, the model expects {want}"
                             f"{'' if shard_id is None else f' for packed part {shard_id}'}")
        for i, part in todo:
            src = (self.full_offsets[i] if shard_id is None else 0) + part.start
            piece = ckpt_narrow(tensor, out_dim, src, part.size)
            copy_into(param[self.offsets[i]:self.offsets[i] + part.size], piece.t() if out_dim == 1 else piece)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.out_sizes, dim=-1)


class RowParallelLinear(Linear):
    """Inputs split over ranks: each rank multiplies its slice, the partial sums are all-reduced, and
    the bias (held whole by every rank) is added once after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE,
                 transposed: bool = False) -> None:
        self.in_start, in_local = tp.shard(in_features)
        super().__init__(in_local, out_features, bias=bias)
        self.tp = tp
        self.transposed = transposed
        set_weight_loader(self.weight, self.load_weight)
        if self.bias is not None:
            set_weight_loader(self.bias, self.load_bias)

    def load_weight(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        in_dim = 0 if self.transposed else 1
        piece = ckpt_narrow(tensor, in_dim, self.in_start, self.in_features)
        copy_into(param, piece.t() if self.transposed else piece)

    def load_bias(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        copy_into(param, ckpt_full(tensor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._matmul(x, self.bias)
        y = self.tp.all_reduce(self._matmul(x, None).contiguous())
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (the vocabulary padded to a multiple of the ranks with zero rows).

    A rank looks up the ids in its range and writes zeros for the others; the all-reduce assembles
    every row. The same weight serves as the LM head's slice of the vocabulary (parallel_logits).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings  # the real vocabulary
        self.per_rank = -(-num_embeddings // tp.size)
        self.start = tp.rank * self.per_rank
        self.num_real = max(0, min(self.per_rank, num_embeddings - self.start))  # rows past the vocab stay zero
        self.tp = tp
        self.weight = nn.Parameter(torch.zeros(self.per_rank, embedding_dim))
        set_weight_loader(self.weight, self.load_rows)

    def load_rows(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        have = ckpt_shape(tensor)[0]
        if have != self.num_embeddings:
            raise ValueError(f"checkpoint has {have} vocabulary rows, the model expects {self.num_embeddings}")
        copy_into(param[:self.num_real], ckpt_narrow(tensor, 0, self.start, self.num_real))
        with torch.no_grad():
            param[self.num_real:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return torch.nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = torch.nn.functional.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        return self.tp.all_reduce(out * inside[:, None].to(out.dtype))


def parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int, tp: TPGroup) -> torch.Tensor | None:
    """(N, hidden) x this rank's vocabulary slice -> (N, vocab) float32 logits on rank 0 (None elsewhere)."""
    from pagellm.models.layers import lm_head_logits

    local = lm_head_logits(hidden, weight)  # (N, per_rank)
    full = tp.gather_to_driver(local)
    if full is None:
        return None
    return full[:, :vocab_size] if full.shape[1] != vocab_size else full


class PPMissingLayer(nn.Module):
    """The place of a module another pipeline stage holds (a decoder layer, the embedding, the final norm, the LM
    head): no weights; the loader skips the checkpoint's tensors under it."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module is held by another pipeline stage")


def pp_missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the modules a pipeline stage does not hold."""
    return tuple(name + "." for name, m in model.named_modules() if isinstance(m, PPMissingLayer))


def held(module_factory, keep: bool) -> nn.Module:
    """`module_factory()` where this stage holds the module, else a PPMissingLayer."""
    return module_factory() if keep else PPMissingLayer()
