"""Training end to end on the tiny GPT-2: the adapter, the report and the run directory."""

import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_recipe
from peftcli.models import locate
from peftcli.recipe import Recipe


def test_the_adapter_loads_with_stock_peft_and_gives_the_same_logits(trained_run):
    plan, _, run = trained_run
    frozen = next(p for p in plan.model.parameters() if not p.requires_grad)
    device, dtype = frozen.device, frozen.dtype  # a GPU trains a bfloat16 base
    ids = torch.tensor([plan.train_data[0]["input_ids"][:32]], device=device)
    plan.model.eval()
    with torch.no_grad():
        expected = plan.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(locate("builtin:tiny-gpt2").path, dtype=dtype).to(device)
    reloaded = PeftModel.from_pretrained(base, run.adapter).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            untrained = reloaded(input_ids=ids).logits
    assert torch.allclose(got.float(), expected.float(), atol=1e-5 if dtype == torch.float32 else 1e-2)
    assert not torch.allclose(got, untrained, atol=1e-4)  # training changed the model


def test_the_run_directory_holds_adapter_recipe_report_and_plot(trained_run):
    _, _, run = trained_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        assert (run.adapter / name).is_file(), name
    assert not any(run.adapter.glob("*.bin")), "weights are written as safetensors only"
    assert (run.root / "loss.png").stat().st_size > 1000
    assert "![loss](loss.png)" in run.report_md.read_text()
    assert "lora adapter for `builtin:tiny-gpt2`" in (run.adapter / "README.md").read_text()


def test_the_saved_recipe_is_the_resolved_recipe(trained_run):
    plan, _, run = trained_run
    saved = Recipe.model_validate(yaml.safe_load(run.recipe.read_text()))
    assert saved == plan.recipe
    assert saved.output_dir == str(run.root)


def test_the_report_has_the_promised_fields(trained_run):
    plan, report, run = trained_run
    on_disk = json.loads(run.report_json.read_text())
    assert on_disk == json.loads(json.dumps(report))
    trainable, total = plan.model.get_nb_trainable_parameters()
    assert on_disk["params"] == {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total}
    assert trainable == 2 * 4 * (64 + 192)  # A (4×64) and B (192×4) on c_attn, in 2 layers
    assert (on_disk["status"], on_disk["stop_reason"]) == ("completed", None)
    assert on_disk["checkpoint"] is None  # no save_steps: nothing to resume from, nothing kept
    training = on_disk["training"]
    assert training["steps"] == 8 and training["skipped_steps"] == []
    assert [p["step"] for p in training["loss_history"]] == list(range(1, 9))
    assert training["tokens"] > 0 and training["tokens_per_s"] > 0
    assert on_disk["eval"]["loss"] < on_disk["eval"]["base_loss"]
    assert on_disk["eval"]["perplexity"] == pytest.approx(torch.tensor(on_disk["eval"]["loss"]).exp().item(), rel=1e-5)
    assert on_disk["memory"]["peak_bytes"] > 0
    assert on_disk["artifacts"]["adapter_weights_bytes"] == (run.adapter / "adapter_model.safetensors").stat().st_size
    assert on_disk["versions"]["torch"] == torch.__version__ and on_disk["versions"]["peft"]
    assert on_disk["hardware"]["cpu_count"] >= 1
    assert on_disk["data"]["train"]["examples"] + on_disk["data"]["eval"]["examples"] == 64


def test_the_bundled_tiny_recipe_trains_from_the_command_line(peft, tmp_path):
    out = tmp_path / "x"
    result = peft("train", ROOT / "recipes" / "tiny-gpt2-lora.yaml", "--output-dir", out)
    assert result.code == 0, result
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["eval"]["loss"] < report["eval"]["base_loss"]
    assert str(out / "report.md") in result.output.replace("\n", "")


def test_the_report_counts_every_non_padding_token_trained_on(tmp_path):
    """Counted on the device and read when training ends (the only step that logs is the first)."""
    from peftcli.recipe import validate_recipe
    from peftcli.rundir import RunDir
    from peftcli.train import build_plan, run_training
    from rich.console import Console

    recipe = validate_recipe(tiny_recipe(train={"max_steps": None, "epochs": 1, "logging_steps": 100}), base_dir=ROOT)
    recipe.output_dir = str(tmp_path / "out")
    plan = build_plan(recipe)
    report = run_training(plan, RunDir(tmp_path / "out"), resume=False, console=Console(quiet=True))
    assert report["training"]["steps"] == plan.steps > 1
    assert report["training"]["tokens"] == plan.train_stats.tokens == sum(map(len, plan.train_data["input_ids"]))
