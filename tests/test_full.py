"""method full: full fine-tuning with the same recipe, data and report; the run holds the whole model."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import no_traceback, tiny_recipe
from peftcli.models import locate

IDS = torch.tensor([[5, 17, 300, 42, 7, 999, 64, 128, 3, 250, 11, 600]])


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Two full fine-tuning runs of tiny GPT-2 through the CLI: every parameter, and the MLPs only."""
    from typer.testing import CliRunner

    import yaml

    from peftcli.cli import app

    root = tmp_path_factory.mktemp("full")
    runs = {}
    for name, modules in (("all", "all"), ("mlp", ["mlp"])):
        recipe = tiny_recipe(name=name, method={"name": "full", "trainable_modules": modules},
                             data={"eval_fraction": 0.25}, train={"max_steps": 6, "lr": 1e-3})
        del recipe["method"]["r"], recipe["method"]["alpha"], recipe["method"]["target_modules"]
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(app, ["train", str(root / f"{name}.yaml"), "-o", str(root / name)])
        assert result.exit_code == 0, result.output
        runs[name] = root / name
    return runs


def base_model():
    return AutoModelForCausalLM.from_pretrained(locate("builtin:tiny-gpt2").path).eval()


def test_full_fine_tuning_trains_every_parameter_and_saves_the_model(full_runs):
    run = full_runs["all"]
    report = json.loads((run / "report.json").read_text())
    base = base_model()
    total = sum(p.numel() for p in base.parameters())
    assert report["params"] == {"trainable": total, "total": total, "trainable_percent": 100.0}
    assert report["method"] == {"name": "full", "trainable_modules": "all"}
    assert report["eval"]["base_loss"] > report["eval"]["loss"]  # measured before training, beaten after
    assert not (run / "adapter").exists() and (run / "model" / "model.safetensors").is_file()
    assert report["artifacts"]["model_weights_bytes"] == (run / "model" / "model.safetensors").stat().st_size
    tuned = AutoModelForCausalLM.from_pretrained(run / "model").eval()  # stock transformers, no peft
    for (name, new), old in zip(tuned.named_parameters(), base.parameters()):
        assert not torch.equal(new, old), name  # every parameter moved
    assert "| model size |" in (run / "report.md").read_text()
    assert "library_name: transformers" in (run / "model" / "README.md").read_text()


def test_the_base_eval_loss_is_the_base_models(full_runs):
    """The same number a LoRA run on the same recipe measures with its adapter switched off."""
    from peftcli.recipe import load_recipe
    from peftcli.train import build_plan, build_trainer
    from peftcli.rundir import RunDir
    from rich.console import Console

    recipe = load_recipe(full_runs["all"] / "recipe.yaml")
    recipe.method = {"name": "lora", "target_modules": ["c_attn"]}
    plan = build_plan(recipe)
    trainer = build_trainer(plan, RunDir(full_runs["all"] / "x"), Console(quiet=True))
    with plan.model.disable_adapter():
        expected = trainer.evaluate()["eval_loss"]
    report = json.loads((full_runs["all"] / "report.json").read_text())
    assert report["eval"]["base_loss"] == pytest.approx(expected, rel=1e-5)


def test_trainable_modules_trains_only_those(full_runs):
    run = full_runs["mlp"]
    report = json.loads((run / "report.json").read_text())
    base = base_model()
    mlp = sum(p.numel() for n, p in base.named_parameters() if ".mlp." in n)
    assert report["params"]["trainable"] == mlp < report["params"]["total"]
    tuned = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    for (name, new), old in zip(tuned.named_parameters(), base.parameters()):
        assert torch.equal(new, old) is (".mlp." not in name), name


def test_generate_loads_the_model_merge_has_nothing_to_do_adapters_lists_it(peft, full_runs):
    run = full_runs["all"]
    said = peft("generate", run, "--prompt", "Hello", "--temperature", 0, "--max-new-tokens", 8)
    direct = peft("generate", run / "model", "--prompt", "Hello", "--temperature", 0, "--max-new-tokens", 8)
    assert said.code == 0 and "fully fine-tuned" in said.output, said
    assert said.output.split("\n", 1)[1] == direct.output.split("\n", 1)[1]
    merged = peft("merge", run)
    assert merged.code == 0 and "nothing to merge" in merged.output and not (run / "merged").exists()
    listed = json.loads(peft("adapters", run.parent, "--json").output)
    assert {(e["name"], e["method"], e["base"]) for e in listed} == {("all", "full", "builtin:tiny-gpt2"),
                                                                     ("mlp", "full", "builtin:tiny-gpt2")}
    entry = next(e for e in listed if e["name"] == "all")
    report = json.loads((run / "report.json").read_text())
    assert entry["trainable_params"] == report["params"]["trainable"] and entry["eval_loss"] == report["eval"]["loss"]


@pytest.mark.parametrize("method,model,fragment", [
    ({"name": "full", "trainable_modules": ["nope"]}, {}, "trainable module(s) ['nope'] not in the model"),
    ({"name": "full"}, {"load_in_4bit": True}, "4-bit weights cannot be trained"),
    ({"name": "full", "trainable_modules": []}, {}, "name at least one module, or use all"),
    ({"name": "full", "r": 8}, {}, "'r' belongs to method"),
])
def test_full_recipe_mistakes(peft, write_recipe, method, model, fragment):
    recipe = tiny_recipe(model=model)
    recipe["method"] = method
    result = peft("validate", write_recipe(recipe))
    assert result.code == 2 and fragment in result.output and no_traceback(result.output), result
    if "nope" in fragment:
        assert "mlp" in result.output and "lm_head" in result.output  # the modules that exist


def test_dry_run_plans_every_parameter(peft, write_recipe):
    recipe = tiny_recipe()
    recipe["method"] = {"name": "full"}
    result = peft("train", write_recipe(recipe), "--dry-run")
    assert result.code == 0 and "full" in result.output, result
    assert re.search(r"trainable percent +100\.0 ", result.output), result.output


def test_count_params_covers_full_fine_tuning(write_recipe):
    from peftcli import params
    from peftcli.recipe import load_recipe

    recipe = tiny_recipe()
    recipe["method"] = {"name": "full", "trainable_modules": ["mlp"]}
    accounting = params.account(load_recipe(write_recipe(recipe)), batch_size=2, seq_len=64)
    base = base_model()
    mlp = sum(p.numel() for n, p in base.named_parameters() if ".mlp." in n)
    assert (accounting.counts.trainable, accounting.counts.total) == (mlp, sum(p.numel() for p in base.parameters()))
    memory = accounting.memory
    assert memory.selected == "full" and list(memory.setups) == ["full"]
    setup = memory.setups["full"]
    assert setup.trainable == 2 * mlp and setup.gradients == 2 * mlp  # bf16 on a GPU
    assert setup.weights == 2 * (accounting.counts.total - mlp)  # the frozen rest
    assert setup.optimizer == 2 * 2 * mlp  # AdamW's two states per trained parameter


def test_a_full_run_resumes_from_its_checkpoint_to_the_same_model(peft, write_recipe, tmp_path):
    import shutil

    from safetensors.torch import load_file

    recipe = tiny_recipe(train={"max_steps": 4, "save_steps": 2, "lr": 1e-3})
    recipe["method"] = {"name": "full", "trainable_modules": ["h.1"]}
    path = write_recipe(recipe)
    assert peft("train", path, "-o", tmp_path / "once").code == 0
    assert peft("train", path, "-o", tmp_path / "twice").code == 0
    shutil.rmtree(tmp_path / "twice" / "model")
    shutil.rmtree(tmp_path / "twice" / "checkpoints" / "checkpoint-4")
    resumed = peft("train", path, "-o", tmp_path / "twice", "--resume")
    assert resumed.code == 0, resumed
    once = load_file(tmp_path / "once" / "model" / "model.safetensors")
    twice = load_file(tmp_path / "twice" / "model" / "model.safetensors")
    assert all(torch.allclose(once[k], twice[k], atol=1e-6) for k in once)
