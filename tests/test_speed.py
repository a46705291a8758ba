"""Speed settings: packing changes nothing that is learned, checkpointing nothing that is computed,
the plan resolves `auto` as documented, and the memory estimate matches what the GPU measured."""

import copy
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import DataCollatorForSeq2Seq

from conftest import ROOT, tiny_recipe
from peftcli import speed
from peftcli.errors import UserError
from peftcli.models import random_config
from peftcli.packing import PackedCollator
from peftcli.recipe import validate_recipe
from peftcli.rundir import RunDir
from peftcli.train import build_plan, run_training

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_recipe(**train):
    return tiny_recipe(model={"base": "builtin:tiny-llama"},
                       method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": PROJECTIONS},
                       train={"batch_size": 4, **train})


def plan_for(recipe: dict):
    return build_plan(validate_recipe(recipe, base_dir=ROOT))


def padded_and_packed(plan, indices):
    """The same examples as a padded batch and as one packed row, with the model prepared for training."""
    pad = DataCollatorForSeq2Seq(plan.tokenizer, padding=True, label_pad_token_id=-100)
    speed.prepare(plan.speed, plan.model, plan.train_data, pad)
    examples = [plan.train_data[i] for i in indices]
    return pad(examples), PackedCollator(plan.train_data, pad)([{"pack": list(indices)}])


@pytest.mark.parametrize("base", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_packed_training_gives_the_unpacked_loss_and_gradients(base):
    recipe = llama_recipe(packing=True, fused_lora=False) if base.endswith("llama") else tiny_recipe(train={"packing": True})
    plan = plan_for(recipe)
    padded, packed = padded_and_packed(plan, range(6))
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" in padded
    model = plan.model.eval()  # gradients still flow; eval only turns GPT-2's dropout off
    twin = copy.deepcopy(model)
    loss_padded = model(**padded).loss
    loss_padded.backward()
    loss_packed = twin(**packed).loss
    loss_packed.backward()
    assert loss_packed.item() == pytest.approx(loss_padded.item(), abs=1e-4)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_packed_examples_never_see_each_other():
    plan = plan_for(llama_recipe(packing=True))
    _, packed = padded_and_packed(plan, [0, 1])
    first = len(plan.train_data[0]["input_ids"])
    changed = {**packed, "input_ids": packed["input_ids"].clone()}
    changed["input_ids"][0, :first] = (changed["input_ids"][0, :first] + 7) % 1000
    plan.model.eval()
    with torch.no_grad():
        before, after = plan.model(**packed).logits, plan.model(**changed).logits
    assert not torch.allclose(before[0, :first], after[0, :first])
    assert torch.allclose(before[0, first:], after[0, first:], atol=1e-6)


def test_on_a_cpu_auto_settings_resolve_to_the_cpu_applicable_ones():
    fast = plan_for(llama_recipe()).speed
    assert (fast.packing, fast.attention, fast.liger, fast.fused_lora) == (False, None, False, True)
    assert (fast.checkpointed, fast.offload, fast.estimated_peak_gib) == (0, False, None)
    lean = plan_for(llama_recipe(profile="lean")).speed
    assert (lean.checkpointed, lean.layers, lean.offload) == (2, 2, False)  # nothing to offload to on a CPU
    assert not plan_for(tiny_recipe()).speed.fused_lora  # dropout 0.05: peft's own layer
    packed = plan_for(llama_recipe(packing=True, max_tokens_per_batch=600))
    assert packed.speed.tokens_per_batch == 600
    assert packed.steps == 3 and packed.speed.describe()["packing"] == "on, 600 tokens per batch"


@pytest.mark.parametrize("train, where", [
    ({"packing": True, "max_tokens_per_batch": 16}, "train.max_tokens_per_batch"),
    ({"liger_kernels": True}, "train.liger_kernels"),
])
def test_settings_this_run_cannot_have_are_refused(train, where):
    with pytest.raises(UserError) as err:
        plan_for(llama_recipe(**train))
    assert err.value.where == where


def test_fused_lora_is_refused_with_dropout():
    with pytest.raises(UserError) as err:
        plan_for(tiny_recipe(train={"fused_lora": True}))
    assert err.value.where == "train.fused_lora" and "dropout" in err.value.hint


def test_checkpointing_changes_memory_not_gradients():
    plans = [plan_for(llama_recipe(profile=p)) for p in ("fast", "lean")]
    grads = []
    for plan in plans:
        padded, _ = padded_and_packed(plan, range(4))
        plan.model.train()
        plan.model(**padded).loss.backward()
        grads.append([p.grad for p in plan.model.parameters() if p.requires_grad])
    layers = speed.decoder_layers(plans[1].model.get_base_model())
    assert [layer.gradient_checkpointing for layer in layers] == [True, True]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_fast_checkpoints_the_fewest_layers_that_fit_the_budget():
    config = random_config("llama-8b-random")
    weights = 16_060_000_000 + 42_000_000 * 16

    def peak(k):
        return speed.estimate_peak_bytes(config, tokens=8192, layers=32, checkpointed=k, offload=False, liger=True,
                                         fixed_bytes=weights) / speed.GIB

    chosen = speed.fewest_checkpointed(peak, layers=32, budget_gib=24)
    assert peak(chosen) <= 24 < peak(chosen - 1)
    assert speed.fewest_checkpointed(peak, layers=32, budget_gib=72) == 0
    assert speed.fewest_checkpointed(peak, layers=32, budget_gib=10) == 32  # nothing fits: checkpoint everything


def test_the_memory_estimate_matches_the_measured_8b_peak():
    """WORKLOAD.md: 8B, LoRA r16 on 7 projections, 4 × 2048 tokens, liger, every layer checkpointed: 20.1 GiB."""
    config = random_config("llama-8b-random")
    lora = 32 * 16 * (2 * 4096 + 2 * (4096 + 1024) + 2 * 4096 + 3 * (4096 + 14336))
    fixed = 8_030_261_248 * 2 + lora * 16
    estimate = speed.estimate_peak_bytes(config, tokens=8192, layers=32, checkpointed=32, offload=False, liger=True,
                                         fixed_bytes=fixed) / speed.GIB
    assert estimate == pytest.approx(20.1, rel=0.1)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The tiny task trained twice, plainly and with every optimisation that runs on a CPU."""
    common = {"epochs": 2, "lr": 3e-3, "max_steps": None, "logging_steps": 1}
    recipes = {
        "plain": llama_recipe(packing=False, fused_lora=False, gradient_checkpointing=False, **common),
        "optimised": llama_recipe(packing=True, profile="lean", **common),
    }
    runs = {}
    for name, recipe in recipes.items():
        recipe["data"]["eval_fraction"] = 0.25
        resolved = validate_recipe(recipe, base_dir=ROOT)
        resolved.output_dir = str(tmp_path_factory.mktemp(name) / "run")
        plan = build_plan(resolved)
        runs[name] = plan, run_training(plan, RunDir(Path(resolved.output_dir)), resume=False,
                                        console=Console(quiet=True))
    return runs


def test_the_optimisations_learn_what_the_plain_path_learns(demo_runs):
    plain, optimised = demo_runs["plain"][1]["eval"], demo_runs["optimised"][1]["eval"]
    assert optimised["base_loss"] == pytest.approx(plain["base_loss"], rel=1e-5)  # same model, same eval batches
    assert optimised["loss"] < 0.95 * optimised["base_loss"]
    assert optimised["loss"] == pytest.approx(plain["loss"], rel=0.02)


def test_the_optimised_run_used_them_and_ran_the_planned_steps(demo_runs):
    plan, result = demo_runs["optimised"]
    assert plan.speed.packing and plan.speed.fused_layers == 14 and plan.speed.checkpointed == 2
    assert result["training"]["steps"] == plan.steps == 2 * len(plan.speed.batches)
    assert result["speed"] == plan.speed.describe()  # the report records what ran
