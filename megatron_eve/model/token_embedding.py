"""The token embedding's weight gradient added straight into its fp32 main grad.

megatron-core's VocabParallelEmbedding looks tokens up with F.embedding, whose backward writes a
dense [vocab, hidden] gradient in the parameter's dtype (at EVE-7B's 32000 x 4096 in bf16: a 262 MB
fill plus the scatter), which DDP's hook then adds into the fp32 main grad (reading it, reading and
writing the 524 MB main grad): about 1.6 GB of memory traffic per micro-batch for the few thousand
rows a packed row touches. With gradient-accumulation fusion on (the linears' protocol: the backward
adds into `main_grad` and marks `grad_added_to_main_grad`, DDP's hook then skips its add), the
lookup's backward here adds the touched rows into the main grad (index_put_ with accumulate: sorted
and deterministic on CUDA), summed in fp32 instead of rounded to bf16 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def with_distinct_rows(ids: torch.Tensor, where: torch.Tensor, rows: int) -> torch.Tensor:
    """`ids` with each position in `where` (a lookup whose output is discarded, so whose gradient is
    zero) given a row of its own, its flat position modulo `rows`, instead of one shared row: CUDA's
    sorted index_put_ adds a row's repeats one after another, and the ~3000 image positions of a
    packed 4096 row all on row 0 made that a chain of 2 ms a micro-batch on an H100 (measured), for
    zeros; spread over distinct rows they add in parallel, still zeros."""
    spread = torch.arange(ids.numel(), device=ids.device).view_as(ids) % rows
    return torch.where(where, spread, ids)


def add_rows_to_main_grad(main_grad: torch.Tensor, ids: torch.Tensor, grad_output: torch.Tensor) -> None:
    """main_grad[ids[i]] += grad_output[i] for every looked-up position (repeated ids add up)."""
    rows = grad_output.reshape(-1, main_grad.shape[1]).to(main_grad.dtype)
    main_grad.index_put_((ids.reshape(-1),), rows, accumulate=True)


class _LookupIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ids, weight = ctx.saved_tensors
        add_rows_to_main_grad(weight.main_grad, ids, grad_output)
        weight.grad_added_to_main_grad = True
        # A placeholder weight gradient (allocated, never written), as megatron-core's fused linears
        # return: DDP's hook fires on it (with overlapped reduction it must), skips its add, drops it.
        return None, torch.empty_like(weight)


class VocabParallelEmbeddingIntoMainGrad(VocabParallelEmbedding):
    """VocabParallelEmbedding whose weight gradient goes into `weight.main_grad` directly when the
    config fuses gradient accumulation and DDP gave the weight a main grad; megatron-core's own
    forward otherwise (no main grad, frozen weight, no grad mode, reduce-scattered output)."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if not self._adds_into_main_grad():
            return super().forward(input_)
        if self.tp_group.size() == 1:
            return _LookupIntoMainGrad.apply(input_, self.weight)
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        ids = with_distinct_rows(input_ - self.vocab_start_index, outside, self.num_embeddings_per_partition)
        # Rows of other shards are zeroed before the sum, so their gradient (rows of this shard) adds zeros.
        output = _LookupIntoMainGrad.apply(ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(output, group=self.tp_group)

    def _adds_into_main_grad(self) -> bool:
        return (self.config.gradient_accumulation_fusion and torch.is_grad_enabled() and self.weight.requires_grad
                and hasattr(self.weight, "main_grad") and not self.reduce_scatter_embeddings
                and self.gtp_remat_size == 1)


def add_gradient_into_main_grad(embedding: VocabParallelEmbedding) -> None:
    """Give megatron-core's embedding (built inside LanguageModelEmbedding) this module's backward.
    Only `forward` differs, so the instance's class is swapped in place (as FSDP2's fully_shard does):
    parameters, initialisation and state-dict keys stay megatron-core's."""
    embedding.__class__ = VocabParallelEmbeddingIntoMainGrad
