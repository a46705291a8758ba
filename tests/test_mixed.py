"""Mixed methods in one recipe (`method:` as a list): peft's mixed model trains them together, the
run saves one adapter per method beside a manifest, and everything that reads runs loads it."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftMixedModel, PeftModel

from conftest import ROOT, no_traceback, tiny_recipe
from peftcli import methods
from peftcli.models import load_model
from peftcli.recipe import load_recipe

IDS = torch.tensor([[5, 17, 300, 42, 7, 999, 64, 128, 3, 250, 11, 600]])
MIXED = [{"name": "lora", "r": 4, "target_modules": "attention"},
         {"name": "loha", "r": 4, "alpha": 8, "target_modules": "mlp"},
         {"name": "dora", "r": 2, "target_modules": ["q_proj"]}]  # overlaps LoRA's q_proj


def mixed_recipe(method=MIXED, **sections):
    recipe = tiny_recipe(**{"model": {"base": "builtin:tiny-llama"}, "data": {"eval_fraction": 0.25},
                            "train": {"max_steps": 8, "lr": 1e-2}, **sections})
    recipe["method"] = method
    return recipe


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One mixed run, and the logits its model gave at the end of training."""
    from rich.console import Console

    from peftcli.recipe import validate_recipe
    from peftcli.rundir import RunDir
    from peftcli.train import build_plan, run_training

    recipe = validate_recipe(mixed_recipe(), base_dir=ROOT)
    recipe.output_dir = str(tmp_path_factory.mktemp("mixed") / "run")
    plan = build_plan(recipe)
    run = RunDir(Path(recipe.output_dir))
    report = run_training(plan, run, resume=False, console=Console(quiet=True))
    plan.model.eval()
    with torch.no_grad():
        trained = plan.model(input_ids=IDS).logits
    return run, report, trained


def test_a_mixed_recipe_trains_every_part_and_reloads_with_identical_logits(mixed_run):
    run, report, trained = mixed_run
    manifest = json.loads((run.adapter / "mixed.json").read_text())
    assert manifest["adapters"] == ["1-lora", "2-loha", "3-dora"] and manifest["methods"] == ["LORA", "LOHA", "LORA"]
    # Loaded the way the model card says: peft's mixed model, one part after the other, all active.
    base = load_model("builtin:tiny-llama", dtype=torch.float32)
    model = PeftMixedModel.from_pretrained(base, str(run.adapter / "1-lora"), adapter_name="1-lora")
    for name in ("2-loha", "3-dora"):
        model.load_adapter(str(run.adapter / name), adapter_name=name)
    model.set_adapter(manifest["adapters"])
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=IDS).logits, trained, atol=1e-5)
        with model.disable_adapter():
            plain = model(input_ids=IDS).logits
    assert not torch.allclose(plain, trained, atol=1e-3)
    reloaded = methods.load_adapter(load_model("builtin:tiny-llama", dtype=torch.float32), run.adapter)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(input_ids=IDS).logits, trained, atol=1e-5)
    # Every part learnt something: each one alone moves the base model.
    for name in manifest["adapters"]:
        alone = PeftModel.from_pretrained(load_model("builtin:tiny-llama", dtype=torch.float32), str(run.adapter / name))
        with torch.no_grad():
            assert not torch.allclose(alone.eval()(input_ids=IDS).logits, plain, atol=1e-4), name


def test_the_report_names_the_mixed_methods(mixed_run):
    run, report, _ = mixed_run
    from peftcli.catalog import tensor_elements

    assert [c["name"] for c in report["method"]["components"]] == ["lora", "loha", "dora"]
    files = sorted(run.adapter.glob("*/adapter_model.safetensors"))
    assert report["params"]["trainable"] == sum(tensor_elements(f) for f in files)
    assert report["artifacts"]["adapter_weights_bytes"] == sum(f.stat().st_size for f in files)
    assert report["training"]["loss_history"][-1]["loss"] < report["training"]["loss_history"][0]["loss"]
    assert report["eval"]["loss"] < report["eval"]["base_loss"]
    assert "| method | lora + loha + dora |" in run.report_md.read_text()
    saved = yaml.safe_load(run.recipe.read_text())["method"]
    assert [m["name"] for m in saved] == ["lora", "loha", "dora"]  # written back as the list it was
    assert load_recipe(run.recipe).method.components[1].alpha == 8


def test_a_mixed_run_merges_generates_and_is_listed(peft, mixed_run, tmp_path):
    run, report, _ = mixed_run
    merged = peft("merge", run.root, "-o", tmp_path / "merged")
    assert merged.code == 0 and "passed" in merged.output, merged
    check = json.loads((tmp_path / "merged" / "merge.json").read_text())["verification"]
    assert check["merged_vs_adapter"]["max_abs_logit_diff"] < 1e-4 and check["conclusive"]
    said = peft("generate", run.root, "--prompt", "Hello", "--temperature", 0, "--max-new-tokens", 6)
    folded = peft("generate", tmp_path / "merged", "--prompt", "Hello", "--temperature", 0, "--max-new-tokens", 6)
    assert said.code == 0 and "lora+loha+dora adapter" in said.output, said
    assert said.output.split("\n", 1)[1] == folded.output.split("\n", 1)[1]
    listed = json.loads(peft("adapters", run.root.parent, "--json").output)
    assert [(e["method"], e["trainable_params"]) for e in listed] == [("lora+loha+dora",
                                                                      report["params"]["trainable"])]
    refused = peft("generate", "builtin:tiny-llama", "--adapter", f"m={run.root}", "--adapter", f"n={run.root}",
                   "--prompt", "x")
    assert refused.code == 2 and "which is used alone" in refused.output
    combined = peft("combine", run.root, run.root, "-o", tmp_path / "c")
    assert combined.code == 2 and "lora+loha+dora adapter cannot be combined" in combined.output


@pytest.mark.parametrize("method,model,fragment", [
    ([{"name": "lora"}, {"name": "prefix"}], {}, "method 1 (prefix) cannot be mixed with others: prompt-learning"),
    ([{"name": "full"}, {"name": "lora"}], {}, "method 0 (full) cannot be mixed with others: full fine-tuning"),
    ([{"name": "lora"}, {"name": "adalora"}], {}, "AdaLoRA moves its rank budget"),
    ([{"name": "lora"}, {"name": "ia3"}], {}, "adapters, not ia3"),
    ([{"name": "lora"}, {"name": "qlora"}], {}, "a list of methods trains on a 16/32-bit base; use lora"),
    ([{"name": "lora"}, {"name": "loha"}], {"load_in_4bit": True}, "LoHa and LoKr have no 4-bit layers"),
    ([{"name": "lora"}], {}, "a list of methods mixes two or more"),
    ([{"name": "lora", "init": "pissa"}, {"name": "loha"}], {}, "init pissa starts from the base weights"),
    ([{"name": "lora"}, {"name": "loha", "use_dora": True}], {}, "method.1.use_dora: 'use_dora' belongs to methods"),
    ([{"name": "lora"}, {"name": "lorax"}], {}, "method.1.name: unknown method 'lorax'; choose one of: lora, dora"),
])
def test_what_peft_cannot_mix_is_refused_at_validation(peft, write_recipe, method, model, fragment):
    recipe = mixed_recipe(method)
    recipe["model"].update(model)
    result = peft("validate", write_recipe(recipe))
    assert result.code == 2 and fragment in " ".join(result.output.split()) and no_traceback(result.output), result


def test_a_mistake_in_one_part_names_its_place_and_line(peft, write_recipe):
    text = yaml.safe_dump(mixed_recipe([{"name": "lora", "target_modules": "attention"},
                                        {"name": "loha", "r": "4"}]), sort_keys=False)
    path = write_recipe(text)
    result = peft("validate", path)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "r: '4'" in l)
    assert result.code == 2 and f"{path}:{line}: method.1.r: input should be a valid integer" in result.output, result
    gpt2 = tiny_recipe()
    gpt2["method"] = [{"name": "lora", "target_modules": ["c_attn"]}, {"name": "loha", "target_modules": "mlp"}]
    result = peft("validate", write_recipe(gpt2))
    assert result.code == 2 and "method.1.target_modules: target module(s)" in result.output
    assert "loha cannot wrap" in result.output


def test_validate_and_count_params_show_each_part(peft, write_recipe):
    path = write_recipe(mixed_recipe())
    result = peft("validate", path)
    assert result.code == 0, result
    assert "1-lora: self_attn.q_proj" in result.output and "2-loha: mlp.gate_proj" in result.output
    counted = peft("count-params", path, "--json")
    assert counted.code == 0, counted
    found = json.loads(counted.output)
    from peftcli.train import build_plan
    plan = build_plan(load_recipe(path))
    assert (found["params"]["trainable"], found["params"]["total"]) == plan.model.get_nb_trainable_parameters()
    assert found["memory"]["selected"] == "adapter"


def test_a_mixed_run_resumes_from_its_checkpoint_to_the_same_adapter(peft, write_recipe, tmp_path):
    """The Trainer checkpoints a mixed model whole (peft cannot save it); resuming restores every part."""
    from safetensors.torch import load_file

    recipe = mixed_recipe(MIXED[:2], train={"max_steps": 4, "save_steps": 2, "lr": 1e-2})
    recipe["data"].pop("eval_fraction")
    path = write_recipe(recipe)
    assert peft("train", path, "-o", tmp_path / "once").code == 0
    first = peft("train", path, "-o", tmp_path / "twice")
    assert first.code == 0, first
    for leftover in ("adapter", "checkpoints/checkpoint-4", "report.json"):  # as if stopped after step 2
        target = tmp_path / "twice" / leftover
        __import__("shutil").rmtree(target) if target.is_dir() else target.unlink()
    resumed = peft("train", path, "-o", tmp_path / "twice", "--resume")
    assert resumed.code == 0, resumed
    for part in ("1-lora", "2-loha"):
        once = load_file(tmp_path / "once" / "adapter" / part / "adapter_model.safetensors")
        twice = load_file(tmp_path / "twice" / "adapter" / part / "adapter_model.safetensors")
        assert once.keys() == twice.keys()
        assert all(torch.allclose(once[k], twice[k], atol=1e-6) for k in once), part


def test_set_overrides_one_part_by_its_position(write_recipe):
    from peftcli.errors import UserError

    path = write_recipe(mixed_recipe())
    recipe = load_recipe(path, ["method.1.r=2", "method.0.target_modules=[q_proj]"])
    assert recipe.method.components[1].r == 2 and recipe.method.components[0].target_modules == ["q_proj"]
    with pytest.raises(UserError, match="'method' is a list of 3; name a position from 0 to 2"):
        load_recipe(path, ["method.5.r=2"])
    with pytest.raises(UserError, match="'method.0.target_modules' is a value, not a section"):
        load_recipe(path, ["method.0.target_modules.0=q_proj"])
