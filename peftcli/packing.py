"""Padding-free packing: examples grouped into token-budget batches, each batch one row.

`token_budget_batches` groups example indices by best-fit decreasing: examples longest first,
each into the fullest batch that still has room, so batches come out nearly full and every
example is in exactly one batch. `PackedCollator` turns a batch into one row with
transformers' `DataCollatorWithFlattening`: the examples concatenated, `position_ids`
restarting at 0 for each, the first label of each example set to -100 (so no token is
trained to predict the next example), and the sequence boundaries for varlen attention.
"""

from __future__ import annotations

import bisect
import math


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped so that each group's total length is at most `budget`.

    Best-fit decreasing: each example, longest first, goes into the batch whose free room is the
    smallest that still holds it. Examples longer than the budget are refused by the caller."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, batch index), sorted
    for i in order:
        spot = bisect.bisect_left(free, (lengths[i], -1))
        if spot == len(free):
            batches.append([i])
            room, index = budget - lengths[i], len(batches) - 1
        else:
            room, index = free.pop(spot)
            batches[index].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, index))
    return batches


def default_budget(lengths: list[int], batch_size: int) -> int:
    """Tokens per batch that keep about `batch_size` examples per step, as unpacked training has,
    so that packing changes the speed and not the number of optimizer steps; at least the longest example."""
    mean = sum(lengths) / len(lengths)
    return max(math.ceil(batch_size * mean), max(lengths))


class PackedCollator:
    """Collates a batch of packs (rows holding the example indices of one token-budget batch) into one
    padding-free row; rows that are plain examples (evaluation) are padded by `pad_collator`."""

    def __init__(self, examples, pad_collator):
        from transformers import DataCollatorWithFlattening

        self.examples = examples
        self.pad_collator = pad_collator
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, features):
        if "pack" not in features[0]:
            return self.pad_collator(features)
        members = [self.examples[i] for feature in features for i in feature["pack"]]
        return self.flatten([{"input_ids": m["input_ids"], "labels": m["labels"]} for m in members])
