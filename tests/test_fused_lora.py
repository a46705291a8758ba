"""The fused LoRA layer computes what peft's LoRA layer computes, forward and backward, or leaves the call to peft."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftcli import fused_lora, models
from peftcli.bench import PROJECTIONS


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that took the fused path."""
    calls = []
    apply = fused_lora.LoraLinearFunction.apply

    def counting(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(fused_lora.LoraLinearFunction, "apply", counting)
    return calls


def test_the_fused_function_passes_gradcheck():
    base = torch.nn.Linear(6, 5, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: fused_lora.LoraLinearFunction.apply(x, a, b, base, 1.5), (x, a, b))


def twin_llamas(dropout=0.0):
    """Two copies of the tiny Llama with the same non-zero LoRA weights; the second one fused."""
    torch.manual_seed(0)
    base = models.load_model("builtin:tiny-llama", dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=PROJECTIONS, task_type="CAUSAL_LM",
                        init_lora_weights=False)
    plain = get_peft_model(copy.deepcopy(base), config)
    fused = get_peft_model(copy.deepcopy(base), config)
    fused.load_state_dict(plain.state_dict())
    return plain, fused, fused_lora.install(fused)


def test_fused_llama_gives_peft_loss_and_gradients(fused_calls):
    plain, fused, installed = twin_llamas()
    assert installed == 14  # 7 projections × 2 layers
    ids = torch.randint(0, 1000, (2, 16))
    expected = plain(input_ids=ids, labels=ids).loss
    expected.backward()
    got = fused(input_ids=ids, labels=ids).loss
    got.backward()
    assert len(fused_calls) == 14
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name


def test_calls_it_cannot_fuse_go_to_peft(fused_calls):
    plain, fused, _ = twin_llamas(dropout=0.1)
    ids = torch.randint(0, 1000, (1, 12))
    torch.manual_seed(1)
    expected = plain(input_ids=ids).logits
    torch.manual_seed(1)
    assert torch.equal(fused(input_ids=ids).logits, expected)  # dropout: peft's own forward, same randomness
    assert not fused_calls
    plain, fused, _ = twin_llamas()
    with fused.disable_adapter(), plain.disable_adapter():  # the base model alone
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not fused_calls
    fused_lora.uninstall(fused)
    assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not fused_calls


def test_a_4bit_base_is_dequantized_like_bitsandbytes_does(fused_calls):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(32, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 32), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer.bias = torch.nn.Parameter(torch.randn(48), requires_grad=False)
    holder = torch.nn.Sequential()
    holder.add_module("proj", layer.to("cpu"))
    holder.is_loaded_in_4bit = True  # as a 4-bit transformers model says: peft then wraps it with its 4-bit layer
    model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(5, 32, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    x.grad = None
    model.zero_grad()
    assert fused_lora.install(model) == 1
    got = model(x)
    got.sum().backward()
    assert fused_calls
    assert torch.allclose(got, expected, atol=1e-5)
    for e, g in zip(expected_grads, [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]):
        assert torch.allclose(e, g, atol=1e-5)
