"""Every method trains, saves and reloads: a memorisation run per method through the real
pipeline (build_plan → run_training), then the adapter on a fresh base gives the same logits,
and the trainable parameters are what peft counts for the same hand-written config."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                  PromptTuningConfig, VeraConfig, get_peft_model)
from rich.console import Console

from conftest import write_jsonl
from peftcli import methods, models
from peftcli.methods.bottleneck import BottleneckConfig
from peftcli.methods.bottleneck.layer import BottleneckModule
from peftcli.recipe import validate_recipe
from peftcli.rundir import RunDir
from peftcli.train import build_plan, build_trainer, run_training

# Sequences over two words: every method can lower the loss (prompt methods by learning the words'
# frequencies, the others by memorising the order), so a fall of 30% is within reach of each.
ROWS = ["yes no yes no yes no yes no", "no yes no yes no yes no yes",
        "yes yes no no yes yes no no", "no no yes yes no no yes yes"]
STEPS = 40

# id: (built-in base, method section, learning rate, the same adapter written with peft by hand)
CASES = {
    "lora": ("tiny-gpt2", {"name": "lora"}, 1e-2, lambda: LoraConfig(r=8, target_modules="all-linear")),
    "dora": ("tiny-llama", {"name": "dora"}, 1e-2, lambda: LoraConfig(r=8, target_modules="all-linear", use_dora=True)),
    "rslora": ("tiny-llama", {"name": "rslora"}, 1e-2, lambda: LoraConfig(r=8, target_modules="all-linear", use_rslora=True)),
    "lora-pissa": ("tiny-llama", {"name": "lora", "init": "pissa"}, 1e-2,
                   lambda: LoraConfig(r=8, target_modules="all-linear", init_lora_weights="pissa")),
    "lora-olora": ("tiny-llama", {"name": "lora", "init": "olora", "target_modules": "attention"}, 1e-2,
                   lambda: LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights="olora")),
    "ia3": ("tiny-gpt2", {"name": "ia3"}, 1e-1, lambda: IA3Config(task_type="CAUSAL_LM")),  # peft's own GPT-2 default
    "prefix": ("tiny-gpt2", {"name": "prefix"}, 5e-2, lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prompt": ("tiny-llama", {"name": "prompt", "init": "text", "init_text": "yes or no"}, 1e-1,
               lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "p_tuning": ("tiny-llama", {"name": "p_tuning"}, 3e-2,
                 lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=64)),
    "loha": ("tiny-llama", {"name": "loha"}, 1e-2, lambda: LoHaConfig(r=8, target_modules="all-linear")),
    "lokr": ("tiny-llama", {"name": "lokr"}, 1e-2, lambda: LoKrConfig(r=8, target_modules="all-linear")),
    "adalora": ("tiny-gpt2", {"name": "adalora"}, 1e-2, None),  # counted below: its config needs the run's length
    "vera": ("tiny-gpt2", {"name": "vera"}, 3e-2, lambda: VeraConfig(r=256, target_modules="all-linear")),
    "adapter-houlsby": ("tiny-gpt2", {"name": "adapter"}, 3e-2, None),
    "adapter-parallel": ("tiny-llama", {"name": "adapter", "variant": "parallel"}, 3e-2, None),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices 64 wide: one thread is several times faster than two (thread hand-offs dominate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The tiny built-ins with the final norm's weight ×8.

    A random-init model's logits stay within about ±1 (|w|·|h| ≈ 0.02·8·8), so no adapter could
    make any token likely; ×8 gives them the range of a trained model's without touching what the
    adapters wrap."""
    root = tmp_path_factory.mktemp("bases")
    found = {}
    for name in ("tiny-gpt2", "tiny-llama"):
        model = models.load_model(f"builtin:{name}", dtype=torch.float32)
        final_norm = model.transformer.ln_f if name == "tiny-gpt2" else model.model.norm
        final_norm.weight.data *= 8
        model.save_pretrained(root / name)
        models.load_tokenizer(f"builtin:{name}").save_pretrained(root / name)
        found[name] = str(root / name)
    return found


@pytest.fixture(scope="module")
def memorised(request, bases, tmp_path_factory):
    """One memorisation run of the method in `request.param`: (case id, plan, report, run directory, base path)."""
    case = request.param
    base, method, lr, _ = CASES[case]
    root = tmp_path_factory.mktemp(case)
    data = write_jsonl(root / "mem.jsonl", [{"text": row} for row in ROWS])
    recipe = validate_recipe({
        "model": {"base": bases[base]}, "method": method,
        "data": {"train": str(data), "eval": str(data), "format": "text"},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": lr, "lr_scheduler": "constant", "warmup_ratio": 0,
                  "logging_steps": 1},
        "output_dir": str(root / "run")}, base_dir=root)
    plan = build_plan(recipe)
    report = run_training(plan, RunDir(Path(recipe.output_dir)), resume=False, console=Console(quiet=True))
    plan.model.eval()
    return case, plan, report, RunDir(Path(recipe.output_dir)), bases[base]


every_method = pytest.mark.parametrize("memorised", list(CASES), indirect=True)


@every_method
def test_the_training_loss_falls_by_at_least_30_percent(memorised):
    case, _, report, _, _ = memorised
    losses = [entry["loss"] for entry in report["training"]["loss_history"]]
    assert len(losses) == STEPS
    assert losses[-1] <= 0.7 * losses[0], f"{case}: {losses[0]:.3f} → {losses[-1]:.3f}"


@every_method
def test_the_saved_adapter_reloads_with_identical_logits(memorised):
    case, plan, _, run, base = memorised
    assert sorted(p.name for p in run.adapter.glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.tensor([plan.train_data[0]["input_ids"]])
    with torch.no_grad():
        trained = plan.model(input_ids=ids).logits
        fresh = models.load_model(base, dtype=torch.float32)
        untouched = fresh(input_ids=ids).logits
        # Stock peft loads every built-in method; only the bottleneck adapter needs peftcli's registration.
        loader = methods.load_adapter if case.startswith("adapter") else PeftModel.from_pretrained
        reloaded = loader(fresh, run.adapter).eval()
        logits = reloaded(input_ids=ids).logits
    assert torch.allclose(logits, trained, atol=1e-5), f"{case}: max diff {(logits - trained).abs().max():.2e}"
    assert not torch.allclose(logits[:, -ids.shape[1]:], untouched, atol=1e-3), f"{case}: training changed nothing"


@every_method
def test_trainable_params_are_what_peft_counts_for_the_same_adapter(memorised, bases):
    case, plan, report, run, base = memorised
    by_flag = sum(p.numel() for p in plan.model.parameters() if p.requires_grad)
    assert report["params"]["trainable"] == by_flag == plan.model.get_nb_trainable_parameters()[0]
    assert by_flag == expected_trainable(case, plan, base)


def expected_trainable(case: str, plan, base: str) -> int:
    """What peft reports for the hand-written equivalent (or, for the bottleneck adapter, the formula)."""
    _, _, _, by_hand = CASES[case]
    if case.startswith("adapter"):
        width, size = 64, 64 // 16  # hidden size, bottleneck at the default reduction factor of 16
        per_module = (width * size + size) + (size * width + width)  # down and up, with biases
        modules = 2 * (2 if case == "adapter-houlsby" else 1)  # 2 blocks; houlsby: after attention and feed-forward
        return modules * per_module
    if case == "adalora":
        from peft import AdaLoraConfig

        config = AdaLoraConfig(init_r=12, target_r=8, target_modules="all-linear", total_step=STEPS)
    else:
        config = by_hand()
    return get_peft_model(models.load_model(base, dtype=torch.float32), config).get_nb_trainable_parameters()[0]


@every_method
def test_the_base_eval_loss_is_the_base_models(memorised):
    """Measured with the adapter disabled, or for PiSSA/OLoRA (whose base is rewritten) before training."""
    case, plan, report, run, base = memorised
    fresh = replace(plan, model=models.load_model(base, dtype=torch.float32))  # the same eval, on the base alone
    expected = build_trainer(fresh, run, Console(quiet=True)).evaluate()["eval_loss"]
    if case == "adalora":  # peft adds AdaLoRA's orthogonality term to every loss, the base's included
        assert report["eval"]["base_loss"] > expected
    else:
        assert report["eval"]["base_loss"] == pytest.approx(expected, rel=1e-5), case
    assert report["eval"]["loss"] < report["eval"]["base_loss"]


@pytest.mark.parametrize("memorised", ["adalora"], indirect=True)
def test_adalora_reallocates_its_rank_budget_over_the_run(memorised):
    _, plan, _, run, _ = memorised
    saved = json.loads((run.adapter / "adapter_config.json").read_text())
    assert saved["total_step"] == plan.steps == STEPS
    assert saved["rank_pattern"], "the budget callback never ran"
    kept = sum(sum(mask) for mask in saved["rank_pattern"].values())
    assert kept < 12 * len(saved["rank_pattern"])  # pruned below init_r on average


@pytest.mark.parametrize("memorised", ["lora-pissa"], indirect=True)
def test_a_pissa_adapter_is_saved_as_plain_lora_for_the_unchanged_base(memorised):
    _, _, _, run, _ = memorised
    saved = json.loads((run.adapter / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 16  # converted: rank 2r, no base rewrite needed


@pytest.mark.parametrize("memorised", ["adapter-houlsby"], indirect=True)
def test_bottleneck_adapters_disable_like_a_builtin_method(memorised):
    _, plan, _, run, base = memorised
    assert "model = load_adapter(base, \"adapter\")" in (run.adapter / "README.md").read_text()  # the model card says how
    ids = torch.tensor([plan.train_data[0]["input_ids"]])
    with torch.no_grad():
        untouched = models.load_model(base, dtype=torch.float32)(input_ids=ids).logits
        trained = plan.model(input_ids=ids).logits
        with plan.model.disable_adapter():
            disabled = plan.model(input_ids=ids).logits
        again = plan.model(input_ids=ids).logits
    assert torch.allclose(disabled, untouched, atol=1e-6)
    assert torch.equal(again, trained) and not torch.allclose(trained, untouched, atol=1e-3)
    with pytest.raises(ValueError, match="cannot be merged"):
        plan.model.merge_and_unload()


@pytest.mark.parametrize("variant", ["houlsby", "parallel"])
def test_a_bottleneck_layer_computes_its_formula(variant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    config = BottleneckConfig(target_modules=["x"], variant=variant, bottleneck_size=3, non_linearity="tanh", scaling=0.5)
    layer = BottleneckModule(linear, "default", config)
    assert torch.equal(layer.adapter_up["default"].weight, torch.zeros(5, 3))  # starts as the base layer
    x = torch.randn(2, 6)
    assert torch.equal(layer(x), linear(x))
    torch.nn.init.normal_(layer.adapter_up["default"].weight)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    source = linear(x) if variant == "houlsby" else x  # in sequence on the output, or beside on the input
    if variant == "houlsby":
        assert down.in_features == 5
    expected = linear(x) + 0.5 * up(torch.tanh(down(source)))
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_a_fresh_adapter_starts_as_the_base_model():
    """Zero-initialised up-projections (and LoRA's B): the adapted model's first step is the base's."""
    from peftcli.recipe import AdapterMethod, LoraMethod

    ids = torch.tensor([[1, 5, 9, 20, 30]])
    for method in (AdapterMethod(), AdapterMethod(variant="parallel"), LoraMethod()):
        model = models.load_model("builtin:tiny-llama", dtype=torch.float32).eval()
        with torch.no_grad():
            before = model(input_ids=ids).logits
            after = methods.attach(model, method)(input_ids=ids).logits
        assert torch.allclose(before, after, atol=1e-6), method.name


@pytest.mark.parametrize("variant", ["houlsby", "parallel"])
def test_bottleneck_adapters_sit_on_the_device_of_what_they_wrap(variant):
    """A 4-bit base is on the GPU before the adapter is attached; a meta-device skeleton stands in for it here.
    (peft's BaseTuner places modules named with the tuner's prefix, `adapter_`, beside what they wrap.)"""
    from peftcli.recipe import AdapterMethod

    skeleton = models.build_empty(models.load_config("builtin:tiny-llama"))
    model = methods.attach(skeleton, AdapterMethod(variant=variant))
    adapters = [p for n, p in model.named_parameters() if ".adapter_" in n]
    assert adapters and all(p.device.type == "meta" for p in adapters)
