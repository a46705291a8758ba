"""NaN/Inf during training (train.on_nan), injected with a learning rate no model survives:
step 1 starts from the base and is finite, its update makes every later loss NaN."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_recipe
from peftcli import checkpoints
from peftcli.cli import app

EXPLODING = {"max_steps": 5, "lr": 1e30, "lr_scheduler": "constant", "warmup_ratio": 0, "save_steps": 1,
             "save_total_limit": None}


def test_on_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(peft, write_recipe, tmp_path):
    out = tmp_path / "out"
    result = peft("train", write_recipe(tiny_recipe(train=EXPLODING)), "-o", out)
    assert result.code == 1, result
    message = " ".join(result.output.split())
    assert "train.on_nan: stop: the loss or a gradient became NaN/Inf at step 2" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-1'}" in message
    assert [step for step, _ in checkpoints.complete(out / "checkpoints")] == [1]  # the faulty step was not saved
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["stop_reason"]) == ("failed", "NaN/Inf loss or gradient at step 2")
    assert [p["step"] for p in report["training"]["loss_history"]] == [1]  # no stand-in loss for step 2
    assert not (out / "adapter").exists()


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("skip")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={**EXPLODING, "on_nan": "skip_step"},
                                                 model={"trust_remote_code": True})))
    result = CliRunner().invoke(app, ["train", str(recipe), "-o", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out"


def test_on_nan_skip_step_leaves_the_faulty_updates_out(skipping_run):
    report = json.loads((skipping_run / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["training"]["skipped_steps"] == [2, 3, 4, 5]
    assert "steps skipped (NaN/Inf) | 2, 3, 4, 5" in (skipping_run / "report.md").read_text()
    final = load_file(skipping_run / "adapter" / "adapter_model.safetensors")
    after_step_1 = load_file(skipping_run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert final.keys() == after_step_1.keys()
    for name, weight in final.items():
        assert torch.equal(weight, after_step_1[name]), name  # no update after step 1 was applied
        assert torch.isfinite(weight).all()
    assert math.isfinite(report["training"]["final_loss"])


def test_the_report_says_when_remote_code_was_trusted(skipping_run, trained_run):
    report = json.loads((skipping_run / "report.json").read_text())
    assert report["model"]["trust_remote_code"] is True
    assert "trust_remote_code | on" in (skipping_run / "report.md").read_text()
    _, untrusting, run = trained_run
    assert untrusting["model"]["trust_remote_code"] is False
    assert "trust_remote_code" not in run.report_md.read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float16 trains with a grad scaler
def test_on_a_gpu_a_nan_stops_the_run_before_anything_faulty_is_saved(peft, write_recipe, tmp_path, dtype):
    out = tmp_path / "out"
    result = peft("train", write_recipe(tiny_recipe(train=EXPLODING, model={"dtype": dtype})), "-o", out)
    assert result.code == 1, result
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["model"]["dtype"] == dtype
    fault = int(report["stop_reason"].rsplit(" ", 1)[1])
    assert f"became NaN/Inf at step {fault}" in " ".join(result.output.split())
    saved = [step for step, _ in checkpoints.complete(out / "checkpoints")]
    assert saved and max(saved) == fault - 1


# Fused AdamW skips a faulty step on the device and the guard reads the verdict later: here at the end
# of training, since no step logs or saves (logging_first_step logs step 1 only).
LATE = {**EXPLODING, "optim": "adamw_torch_fused", "save_steps": None, "logging_steps": 100}


def test_with_fused_adamw_the_faulty_updates_are_left_out_on_the_device_and_reported(tmp_path):
    def train(steps: int, folder: str):
        recipe = tmp_path / f"{folder}.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(train={**LATE, "max_steps": steps, "on_nan": "skip_step"})))
        result = CliRunner().invoke(app, ["train", str(recipe), "-o", str(tmp_path / folder)])
        assert result.exit_code == 0, result.output
        return tmp_path / folder

    skipping, one_step = train(5, "skipping"), train(1, "one-step")
    report = json.loads((skipping / "report.json").read_text())
    assert report["training"]["skipped_steps"] == [2, 3, 4, 5]
    final = load_file(skipping / "adapter" / "adapter_model.safetensors")
    after_step_1 = load_file(one_step / "adapter" / "adapter_model.safetensors")
    assert final.keys() == after_step_1.keys()
    for name, weight in final.items():
        assert torch.equal(weight, after_step_1[name]), name


def test_with_fused_adamw_a_stop_learnt_a_step_late_names_the_faulty_step(peft, write_recipe, tmp_path):
    out = tmp_path / "out"
    result = peft("train", write_recipe(tiny_recipe(train=LATE)), "-o", out)
    assert result.code == 1, result
    assert "the loss or a gradient became NaN/Inf at step 2" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["stop_reason"]) == ("failed", "NaN/Inf loss or gradient at step 2")
    assert report["training"]["steps"] == 3  # learnt before step 3's update, which was left out too
    assert all(math.isfinite(p["loss"]) for p in report["training"]["loss_history"])
