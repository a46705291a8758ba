"""The varlen attention glue (sequence bounds, layout, padding), checked on the CPU against sdpa with a
reference kernel that has varlen_attn's contract; the kernel itself is checked on the GPU (test_gpu_speed)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe
from peftcli import models, varlen


@pytest.fixture
def reference_kernel(monkeypatch):
    """varlen_attn's contract, computed one sequence at a time with sdpa; records its calls."""
    calls = []

    def varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), scale=None,
                    enable_gqa=False):
        assert q.ndim == k.ndim == 3 and cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
        lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
        assert max_q == max_k == max(lengths) and q.shape[0] == sum(lengths)
        calls.append(lengths)
        out = []
        for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=window_size == (-1, 0), scale=scale,
                                                      enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(out)

    monkeypatch.setattr(varlen, "kernel", lambda: varlen_attn)
    varlen._parameters.cache_clear()
    yield calls
    varlen._parameters.cache_clear()


@pytest.fixture(scope="module")
def llama():
    model = models.load_model("builtin:tiny-llama", dtype=torch.float32).eval()
    model.config.use_cache = False
    varlen.register()
    return model


# varlen attends in bf16 (the flash kernel takes 16-bit inputs: varlen._attend casts this float32 model's
# states), so its logits differ from float32 sdpa's by bf16 rounding, about 2e-3 here; an example that saw
# another, or padding, would move them by about 0.5.
BF16_ROUNDING = 1e-2


def logits(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


def test_sequence_bounds_come_from_position_restarts_and_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    cu, longest, keep = varlen._bounds_from_positions(positions, None, 1, 6, "cpu")
    assert cu.tolist() == [0, 3, 5, 6] and longest == 3 and keep is None
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    cu, longest, keep = varlen._bounds_from_positions(torch.arange(4)[None], mask, 2, 4, "cpu")
    assert cu.tolist() == [0, 3, 5] and longest == 3 and keep.tolist() == [0, 1, 2, 4, 5]


def test_a_packed_row_gives_each_example_its_own_logits(llama, reference_kernel):
    first, second = torch.randint(0, 1000, (1, 5)), torch.randint(0, 1000, (1, 9))
    row = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(5), torch.arange(9)])[None]
    alone = [logits(llama, "sdpa", input_ids=first), logits(llama, "sdpa", input_ids=second)]
    for bounds in ({}, {"cu_seq_lens_q": torch.tensor([0, 5, 14], dtype=torch.int32), "max_length_q": 9}):
        packed = logits(llama, varlen.NAME, input_ids=row, position_ids=positions, **bounds)
        assert torch.allclose(packed[:, :5], alone[0], atol=BF16_ROUNDING)
        assert torch.allclose(packed[:, 5:], alone[1], atol=BF16_ROUNDING)
    assert reference_kernel == [[5, 9]] * 4  # 2 layers, 2 forwards: every attention went through the kernel


def test_a_padded_batch_is_unpadded_and_matches_sdpa(llama, reference_kernel):
    ids = torch.randint(0, 1000, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    expected = logits(llama, "sdpa", input_ids=ids, attention_mask=mask)
    got = logits(llama, varlen.NAME, input_ids=ids, attention_mask=mask)
    assert reference_kernel == [[8, 5]] * 2
    assert torch.allclose(got[0], expected[0], atol=BF16_ROUNDING)
    assert torch.allclose(got[1, :5], expected[1, :5], atol=BF16_ROUNDING)


def test_varlen_is_refused_where_it_cannot_run(peft, write_recipe):
    assert not varlen.available()  # the CPU suite has no CUDA
    recipe = write_recipe(tiny_recipe(model={"attn_implementation": "varlen"}))
    result = peft("train", recipe, "--dry-run")
    assert result.code == 2 and "model.attn_implementation" in result.output and "varlen" in result.output
