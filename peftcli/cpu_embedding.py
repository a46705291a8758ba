"""The input embedding table in CPU memory (`train.offload_embeddings`, on for the lean profile).

An input embedding is a lookup: a step reads one row per token and, when the table is frozen
and not shared with the output head, nothing else touches it. Kept in CPU memory, it frees
vocab × hidden weights of GPU memory (1 GiB for Llama-3.1-8B in bf16) for the cost of sending
the token ids to the CPU and their rows back: 16 MiB per 1,000 tokens at the 8B shape.
"""

from __future__ import annotations

import torch


def offloadable(base):
    """The model's input embedding when it can live in CPU memory: a plain nn.Embedding (no adapter on
    it), frozen, and not tied to the output head; else None."""
    table = base.get_input_embeddings()
    if type(table) is not torch.nn.Embedding or table.weight.requires_grad:
        return None
    head = base.get_output_embeddings()
    if head is not None and head.weight is table.weight:
        return None
    return table


class CpuEmbedding(torch.nn.Embedding):
    """A frozen nn.Embedding whose table stays in CPU memory whatever `.to()` asks; it looks the ids up
    on the CPU and returns the rows on the ids' device."""

    def _apply(self, fn, recurse=True):  # Module.to/cuda/half: the table stays where it is
        return self

    def forward(self, input_ids):
        if input_ids.device.type == "cpu":
            return super().forward(input_ids)
        # The ids come back at the cost of a wait for the GPU, which the step's first mask computation
        # makes anyway. The rows are gathered into page-locked memory, so their copy to the GPU runs
        # asynchronously and at full bus speed: from pageable memory it would be staged, and block.
        ids = input_ids.to("cpu").flatten()
        rows = torch.empty(ids.numel(), self.embedding_dim, dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids, out=rows)
        return rows.to(input_ids.device, non_blocking=True).view(*input_ids.shape, self.embedding_dim)


def offload(base) -> None:
    """Replace `base`'s input embedding by a CpuEmbedding holding the same table in CPU memory."""
    table = offloadable(base)
    base.set_input_embeddings(CpuEmbedding(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx,
                                           _weight=table.weight.detach().to("cpu"), _freeze=True))
