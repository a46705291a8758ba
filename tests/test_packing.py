"""Token-budget batches and the padding-free collator."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DataCollatorForSeq2Seq

from peftcli.packing import PackedCollator, default_budget, token_budget_batches


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 512).flatmap(lambda budget: st.tuples(
    st.just(budget), st.lists(st.integers(1, budget), min_size=1, max_size=300))))
def test_batches_respect_the_budget_and_hold_every_example_once(case):
    budget, lengths = case
    batches = token_budget_batches(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= budget for batch in batches)
    # no two batches could have been one: so no batch is wasted and at most one is half empty
    totals = sorted(sum(lengths[i] for i in batch) for batch in batches)
    assert len(totals) < 2 or totals[0] + totals[1] > budget


def test_batches_fill_up_with_short_examples():
    lengths = [300, 250, 200, 60, 50, 40, 30, 20, 10]
    batches = token_budget_batches(lengths, 320)
    assert [sum(lengths[i] for i in b) for b in batches] == [320, 320, 320]  # 960 tokens, no room wasted


def test_the_default_budget_keeps_about_batch_size_examples_per_batch():
    lengths = [40, 60, 50, 50, 30, 70] * 10
    budget = default_budget(lengths, batch_size=4)
    assert budget == 200
    batches = token_budget_batches(lengths, budget)
    assert len(batches) in (15, 16)  # about as many steps as the 15 unpacked batches of 4
    assert default_budget([10, 500], batch_size=1) == 500  # the longest example always fits


def test_the_collator_concatenates_a_batch_with_restarting_positions_and_no_cross_example_label():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
                {"input_ids": [8, 9], "labels": [8, 9], "attention_mask": [1, 1]},
                {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1]}]
    collator = PackedCollator(examples, pad_collator=None)
    batch = collator([{"pack": [2, 0]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4, -100, 6, 7]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7] and batch["max_length_q"] == 4
    assert "attention_mask" not in batch  # a mask would hide the packing from transformers' mask builder


def test_the_collator_pads_plain_examples_for_evaluation(tmp_path):
    from peftcli import models

    tokenizer = models.load_tokenizer("builtin:tiny-gpt2")
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    collator = PackedCollator([], pad)
    batch = collator([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
                      {"input_ids": [8], "attention_mask": [1], "labels": [8]}])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"][1].tolist() == [8, -100, -100]
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
