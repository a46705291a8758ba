"""Speed settings: packing changes nothing that is learned, checkpointing nothing that is computed,
the plan resolves `auto` as documented, and the memory estimate matches what the GPU measured."""

import collections
import copy
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import DataCollatorForSeq2Seq

from conftest import ROOT, gpu_estimate, tiny_recipe
from peftcli import fused_lora, methods, params, speed, varlen
from peftcli.bench import PROJECTIONS
from peftcli.errors import UserError
from peftcli.packing import PackedCollator
from peftcli.recipe import validate_recipe
from peftcli.rundir import RunDir
from peftcli.train import build_plan, run_training


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


def test_micro_batches_split_each_packed_batch_and_accumulate():
    whole = plan_for(llama_recipe(packing=True, max_tokens_per_batch=600))
    split = plan_for(llama_recipe(packing=True, max_tokens_per_batch=600, micro_batches=2))
    lengths = [len(ids) for ids in split.train_data["input_ids"]]
    assert (whole.speed.micro_batches, split.speed.micro_batches, split.accumulation) == (1, 2, 2)
    assert split.speed.tokens_per_batch == 300 and all(sum(lengths[i] for i in b) <= 300 for b in split.speed.batches)
    assert sorted(i for b in split.speed.batches for i in b) == list(range(len(lengths)))
    assert split.speed.describe()["packing"] == "on, 2 micro-batches of 300 tokens per batch"
    assert split.speed.memory.step.tokens <= 300 < whole.speed.memory.step.tokens  # estimated per micro-batch


@pytest.mark.parametrize("base, load_in_4bit, micro", [
    ("builtin:llama-8b-random", False, 1),  # activations at 8,192 tokens, checkpointed: ~10% of 15 GiB of model
    ("builtin:llama-8b-random", True, 1),  # the same next to a 4-bit model of 4.6 GiB, 15 GiB in 16-bit
    ("builtin:llama-1b-random", False, 2),  # next to 2.4 GiB of a 1B model
])
def test_lean_splits_only_where_activations_are_a_large_part_of_the_peak(base, load_in_4bit, micro):
    lean = gpu_estimate(base, profile="lean", load_in_4bit=load_in_4bit)
    assert lean.step.tokens == 4 * 2048 // micro
    activations = lean.peak() - lean.static_bytes()
    sixteen_bit = lean.setups["adapter"]
    reference = sixteen_bit.weights + sixteen_bit.trainable + sixteen_bit.optimizer + sixteen_bit.overhead
    assert speed.sixteen_bit_model_bytes(lean) == reference
    assert activations <= speed.LEAN_ACTIVATION_SHARE * reference
    if load_in_4bit:  # split as the 4-bit model's own memory would have it
        assert activations > speed.LEAN_ACTIVATION_SHARE * lean.static_bytes()
    if micro > 1:  # one micro-batch fewer would not have been lean enough
        fewer = gpu_estimate(base, profile="lean", load_in_4bit=load_in_4bit, micro_batches=micro // 2)
        assert fewer.peak() - fewer.static_bytes() > speed.LEAN_ACTIVATION_SHARE * speed.sixteen_bit_model_bytes(fewer)


@pytest.mark.parametrize("train, where", [
    ({"packing": True, "max_tokens_per_batch": 16}, "train.max_tokens_per_batch"),
    ({"packing": True, "max_tokens_per_batch": 600, "micro_batches": 8}, "train.micro_batches"),
    ({"packing": False, "micro_batches": 2}, "train.micro_batches"),
    ({"liger_kernels": True}, "train.liger_kernels"),
])
def test_settings_this_run_cannot_have_are_refused(train, where):
    with pytest.raises(UserError) as err:
        plan_for(llama_recipe(**train))
    assert err.value.where == where


def test_count_params_refuses_micro_batches_of_an_unpacked_run_as_train_does():
    with pytest.raises(UserError) as err:
        gpu_estimate("builtin:llama-1b-random", packing=False, micro_batches=2)
    assert err.value.where == "train.micro_batches"


def test_fused_lora_is_refused_with_dropout():
    with pytest.raises(UserError) as err:
        plan_for(tiny_recipe(train={"fused_lora": True}))
    assert err.value.where == "train.fused_lora" and "dropout" in err.value.hint


def test_checkpointing_changes_memory_not_gradients(monkeypatch):
    plans = [plan_for(llama_recipe(profile=p)) for p in ("fast", "lean")]
    weight_uses = collections.Counter()  # base matmuls per projection: forward, recompute, backward
    dense_weight = fused_lora.dense_weight
    monkeypatch.setattr(fused_lora, "dense_weight", lambda base, dtype: weight_uses.update([base]) or dense_weight(base, dtype))
    grads = []
    for plan in plans:
        padded, _ = padded_and_packed(plan, range(4))
        plan.model.train()
        plan.model(**padded).loss.backward()
        grads.append([p.grad for p in plan.model.parameters() if p.requires_grad])
    layers = speed.decoder_layers(plans[1].model.get_base_model())
    assert [layer.gradient_checkpointing for layer in layers] == [True, True]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    # the recompute skips the down projection's base matmul: the layer only adds its output to the residual
    assert [weight_uses[layer.mlp.down_proj.base_layer] for layer in layers] == [2, 2]
    assert [weight_uses[layer.mlp.up_proj.base_layer] for layer in layers] == [3, 3]


def test_compiled_checkpointed_layers_give_the_eager_gradients():
    """torch.compile traces a checkpointed layer's recompute with its forward and refuses other checkpoint
    contexts than selective checkpointing's: compiled layers recompute in full."""
    results = []
    for compiled in (False, True):
        plan = plan_for(llama_recipe(profile="lean", compile=compiled))
        padded, _ = padded_and_packed(plan, range(4))
        plan.model.train()
        loss = plan.model(**padded).loss
        loss.backward()
        results.append((loss, [p.grad for p in plan.model.parameters() if p.requires_grad]))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, compiled))


def test_count_params_assumes_what_peft_train_runs_on_a_gpu():
    llama = gpu_estimate("builtin:llama-1b-random")
    assert llama.path == params.SpeedPath(profile="fast", packing=True, attention="varlen", liger_kernels=True,
                                          fused_lora=True, offload_activations=False) or not varlen.kernel()
    assert llama.step == params.Step(1, 4 * 2048)  # packed: the token budget of 4 full-length examples
    assert llama.checkpointed == 0  # fast: the 1B fits in the default budget (24 GiB) with every layer kept
    assert gpu_estimate("builtin:llama-1b-random", max_tokens_per_batch=5000).step.tokens == 5000
    lean = gpu_estimate("builtin:llama-1b-random", profile="lean")
    assert lean.checkpointed == 16 and lean.path.offload_activations
    gpt2 = gpu_estimate("builtin:tiny-gpt2", batch_size=2, seq_len=64, targets=["c_attn"])  # neither varlen nor liger for GPT-2
    assert (gpt2.path.packing, gpt2.path.attention, gpt2.path.liger_kernels, gpt2.step) == (
        False, "sdpa", False, params.Step(2, 64))


def test_fast_checkpoints_the_fewest_layers_that_fit_the_budget():
    def planned(budget):
        return gpu_estimate("builtin:llama-8b-random", max_memory_gib=budget)

    chosen = planned(24)
    assert 0 < chosen.checkpointed < 32 and chosen.bytes / speed.GIB <= 24 < chosen.peak(chosen.checkpointed - 1) / speed.GIB
    assert planned(72).checkpointed == 0
    assert planned(10).checkpointed == 32  # nothing fits: checkpoint everything


def test_fast_plans_within_a_budget_of_the_models_by_default():
    """With no train.max_memory_gib, fast plans within 24 GiB for a 16-bit model up to 16 GiB (1.5× the model
    beyond), a 4-bit base's share of that, and within 90% of a smaller GPU: the same plan on every GPU it fits."""
    lora_8b, qlora_8b = gpu_estimate("builtin:llama-8b-random"), gpu_estimate("builtin:llama-8b-random", load_in_4bit=True)
    assert speed.default_budget_gib(lora_8b, None) == 24
    assert 0 < lora_8b.checkpointed < 32 and lora_8b.bytes <= 24 * speed.GIB
    share = qlora_8b.static_bytes() / qlora_8b.static_bytes("adapter")
    assert 0.3 < share < 0.4 and speed.default_budget_gib(qlora_8b, None) == pytest.approx(24 * share)
    assert qlora_8b.checkpointed > lora_8b.checkpointed and qlora_8b.bytes <= 24 * share * speed.GIB
    assert speed.default_budget_gib(lora_8b, 80.0) == 24 and speed.default_budget_gib(lora_8b, 16.0) == pytest.approx(14.4)
    recipe = validate_recipe({"model": {"base": "builtin:llama-8b-random"}, "method": {"name": "full"}}, base_dir=ROOT)
    full = speed.estimate_on_a_gpu(recipe, params.build_skeleton(recipe), batch_size=4, seq_len=2048)
    assert full.static_bytes() > 16 * speed.GIB  # past the floor: half the model's memory again for activations
    assert speed.default_budget_gib(full, None) == pytest.approx(1.5 * full.static_bytes() / speed.GIB)
    assert speed.default_budget_gib(full, 40.0) == pytest.approx(36)


def test_fast_offloads_checkpointed_inputs_where_that_spares_recomputing_layers():
    def planned(**train):
        return gpu_estimate("builtin:llama-8b-random", max_memory_gib=24, **train)

    kept, offloaded = planned(offload_activations=False), planned()
    assert offloaded.path.offload_activations and 0 < offloaded.checkpointed < kept.checkpointed
    assert offloaded.bytes <= 24 * speed.GIB
    assert not planned(gradient_checkpointing=True).path.offload_activations  # as many layers either way
    assert not gpu_estimate("builtin:llama-8b-random", max_memory_gib=72).path.offload_activations  # none checkpointed


def test_fast_within_a_tight_budget_offloads_then_splits_before_it_gives_up():
    """Past checkpointing every layer, fast's next steps within max_memory_gib are the checkpointed layers'
    inputs in CPU memory, then smaller micro-batches: each only where the ones before it do not fit."""
    def qlora_8b(**train):
        return gpu_estimate("builtin:llama-8b-random", load_in_4bit=True, **train)

    roomy = qlora_8b(max_memory_gib=48)
    assert (roomy.checkpointed, roomy.path.offload_activations, roomy.step.tokens) == (0, False, 8192)
    assert qlora_8b(max_memory_gib=9, offload_activations=False, micro_batches=1).bytes > 9 * speed.GIB
    offloaded = qlora_8b(max_memory_gib=9)  # checkpointing every layer was not enough: offloading is
    assert offloaded.path.offload_activations and offloaded.step.tokens == 8192 and offloaded.bytes <= 9 * speed.GIB
    assert qlora_8b(max_memory_gib=7, micro_batches=1).bytes > 7 * speed.GIB  # offloading is not enough
    split = qlora_8b(max_memory_gib=7)
    assert split.path.offload_activations and split.step.tokens == 4096 and split.bytes <= 7 * speed.GIB


def test_a_run_is_estimated_at_its_largest_step():
    packed = plan_for(llama_recipe(packing=True, max_tokens_per_batch=600)).speed
    lengths = [len(ids) for ids in plan_for(llama_recipe()).train_data["input_ids"]]
    fullest = max(sum(lengths[i] for i in batch) for batch in packed.batches)
    assert packed.memory.step == params.Step(1, fullest, masked=True)  # sdpa on a CPU: the packed row gets a mask
    padded = plan_for(llama_recipe()).speed.memory.step
    assert padded == params.Step(4, max(lengths), masked=min(lengths) < max(lengths))
    lean = plan_for(llama_recipe(profile="lean")).speed
    assert lean.memory.checkpointed == lean.checkpointed == 2


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The tiny task trained twice, plainly and with every optimisation that runs on a CPU."""
    common = {"epochs": 2, "lr": 3e-3, "max_steps": None, "logging_steps": 1}
    recipes = {
        "plain": llama_recipe(packing=False, fused_lora=False, gradient_checkpointing=False, **common),
        "optimised": llama_recipe(packing=True, profile="lean", micro_batches=2, **common),
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
    assert result["training"]["steps"] == plan.steps == 2 * math.ceil(len(plan.speed.batches) / plan.accumulation)
    assert result["speed"] == plan.speed.describe()  # the report records what ran


GPU = speed.Machine("cuda", varlen=True, liger=True, memory_gib=80.0)


def tiny_llama_with(method: dict, model=None, train=None):
    """The tiny recipe on the tiny Llama, with `method` in place of its LoRA."""
    recipe = tiny_recipe(model={"base": "builtin:tiny-llama", **(model or {})}, train=train or {})
    return validate_recipe({**recipe, "method": method}, base_dir=ROOT)


def resolved_on_a_gpu(method: dict, **train) -> params.SpeedPath:
    recipe = tiny_llama_with(method, train=train)
    return speed.resolve_path(recipe, methods.base_model(params.build_skeleton(recipe).model), GPU)


@pytest.mark.parametrize("method", [{"name": "prompt"}, {"name": "prefix"}, {"name": "p_tuning"}])
def test_prompt_learning_neither_packs_nor_takes_varlen_attention(method):
    """Virtual tokens go in front of each row: a packed row holds several examples, and varlen attention's
    sequence bounds are known before the virtual tokens are added."""
    lora = resolved_on_a_gpu({"name": "lora", "target_modules": ["q_proj"]})
    assert (lora.packing, lora.attention) == (True, "varlen")
    path = resolved_on_a_gpu(method)
    assert (path.packing, path.attention, path.liger_kernels) == (False, "sdpa", True)
    with pytest.raises(UserError) as packing:
        resolved_on_a_gpu(method, packing=True)
    assert packing.value.where == "train.packing"
    recipe = tiny_llama_with(method, model={"attn_implementation": "varlen"})
    with pytest.raises(UserError) as attention:
        speed.resolve_path(recipe, methods.base_model(params.build_skeleton(recipe).model), GPU)
    assert attention.value.where == "model.attn_implementation"


def test_liger_keeps_the_mlp_forward_of_an_adapter_that_wraps_the_mlp():
    """liger swaps the forward of each layer's `mlp` for its SwiGLU: a parallel bottleneck adapter wraps that block."""
    def config(method: dict) -> dict:
        recipe = tiny_llama_with(method)
        return speed.liger_kernel_config(params.build_skeleton(recipe).model)

    assert config({"name": "adapter", "variant": "parallel"}) == {"swiglu": False}
    assert config({"name": "adapter"}) == {}
    assert config({"name": "lora", "target_modules": PROJECTIONS}) == {}
