"""Interruption and resume, by really signalling a `python -m peftcli train` process.

An interrupted run resumed with --resume must end exactly where the same run uninterrupted
ends: the same loss at every step and the same adapter weights (CPU, fp32; on a GPU in
bfloat16, within its rounding)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Trainer

from conftest import ROOT, tiny_recipe
from peftcli import checkpoints
from peftcli.rundir import LOCK, RunDir

STEPS = 10


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(train={"max_steps": STEPS, "save_steps": 2, "lr": 3e-3})))
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    from typer.testing import CliRunner

    from peftcli.cli import app

    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = CliRunner().invoke(app, ["train", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


class Training:
    """`python -m peftcli train` in a child process, its output collected as it comes."""

    def __init__(self, recipe, out):
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peftcli", "train", str(recipe), "-o", str(out)], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                 "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    @property
    def output(self) -> str:
        return " ".join("".join(self.lines).split())

    def wait_for(self, condition, timeout: float = 180) -> None:
        """Poll until `condition()` holds; fail if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the run ended first:\n{self.output}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output}"
            time.sleep(0.02)

    def wait_for_a_checkpoint(self) -> None:
        self.wait_for(lambda: checkpoints.latest(self.out / "checkpoints") is not None)

    def finish(self) -> int:
        code = self.process.wait(timeout=180)
        time.sleep(0.1)  # let the reader take the last lines
        return code


def interrupted(recipe, out, number=signal.SIGINT, meanwhile=lambda training: None) -> dict:
    """The report of a run stopped by signal `number` once its first checkpoint was out
    (`meanwhile(training)` runs just before the signal is sent)."""
    training = Training(recipe, out)
    training.wait_for_a_checkpoint()
    meanwhile(training)
    training.process.send_signal(number)
    assert training.finish() == 128 + number, training.output
    name = signal.Signals(number).name
    assert f"interrupted: stopped by {name} at step" in training.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted" and report["stop_reason"].startswith(f"{name} at step")
    assert report["checkpoint"] == str(RunDir(out).latest_checkpoint())
    return report


def assert_resumes_to_the_uninterrupted_result(peft, recipe, out, uninterrupted, *extra, tolerance=1e-6):
    result = peft("train", recipe, "-o", out, "--resume", *extra)
    assert result.code == 0, result
    got, expected = (json.loads((run / "report.json").read_text())["training"] for run in (out, uninterrupted))
    assert [p["step"] for p in got["loss_history"]] == list(range(1, STEPS + 1))
    assert got["tokens"] == expected["tokens"]  # counted before the interruption too, as its checkpoint holds them
    # the speed of the resumed part alone: at most 8 of the 10 steps (a checkpoint came first; runtime rounded)
    assert got["tokens_per_s"] * got["train_runtime_s"] < 0.9 * got["tokens"]
    assert [p["loss"] for p in got["loss_history"]] == pytest.approx([p["loss"] for p in expected["loss_history"]],
                                                                     rel=tolerance, abs=tolerance)
    weights, reference = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (out, uninterrupted))
    assert weights.keys() == reference.keys()
    for name in weights:
        assert torch.allclose(weights[name], reference[name], atol=tolerance), name


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_ends_as_if_never_interrupted(peft, recipe, uninterrupted, tmp_path):
    out = tmp_path / "out"

    def a_second_run_on_the_same_folder(training):
        busy = peft("train", recipe, "-o", out, "--resume")
        assert busy.code == 2 and f"another peft train (PID {training.process.pid})" in busy.output

    report = interrupted(recipe, out, meanwhile=a_second_run_on_the_same_folder)
    assert RunDir(out).latest_checkpoint().name == f"checkpoint-{report['training']['steps']}"
    assert report["training"]["steps"] < STEPS and report["artifacts"]["adapter_dir"] is None
    assert not (out / "adapter").exists() and not (out / LOCK).exists()
    assert_resumes_to_the_uninterrupted_result(peft, recipe, out, uninterrupted,
                                               "--set", "train.save_total_limit=3")  # a harmless change


@pytest.mark.slow
def test_sigterm_stops_the_same_way_and_exits_143(recipe, tmp_path):
    report = interrupted(recipe, tmp_path / "out", signal.SIGTERM)  # exit 143 is checked there
    assert report["training"]["steps"] < STEPS


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_the_newest_checkpoint_still_resumes(peft, recipe, uninterrupted,
                                                                                tmp_path):
    out = tmp_path / "out"
    training = Training(recipe, out)
    training.wait_for_a_checkpoint()
    training.process.send_signal(signal.SIGINT)
    training.wait_for(lambda: "again stops at once" in training.output)
    training.process.send_signal(signal.SIGINT)
    assert training.finish() == 130, training.output
    # It did not wait for the step, the checkpoint and the report of the graceful stop.
    assert "stopped by SIGINT" not in training.output and not (out / "report.json").exists()
    assert_resumes_to_the_uninterrupted_result(peft, recipe, out, uninterrupted)


@pytest.mark.slow
def test_a_crash_while_a_checkpoint_is_written_leaves_the_previous_one_newest(peft, recipe, uninterrupted, tmp_path,
                                                                            monkeypatch):
    write_rng_state = Trainer._save_rng_state

    def crash_at_step_4(trainer, output_dir):  # weights and optimizer are written by then, the state file is not
        if trainer.state.global_step == 4:
            raise KeyboardInterrupt
        write_rng_state(trainer, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_step_4)
    out = tmp_path / "out"
    assert peft("train", recipe, "-o", out).code == 130
    half_written = checkpoints.staging(out / "checkpoints") / "checkpoint-4"
    assert (half_written / "adapter_model.safetensors").is_file() and (half_written / "optimizer.pt").is_file()
    assert RunDir(out).latest_checkpoint() == out / "checkpoints" / "checkpoint-2"
    assert not (out / LOCK).exists()
    monkeypatch.undo()
    assert_resumes_to_the_uninterrupted_result(peft, recipe, out, uninterrupted)
    assert not checkpoints.staging(out / "checkpoints").exists()


def test_ctrl_c_saves_a_checkpoint_even_without_save_steps(peft, write_recipe, tmp_path, monkeypatch):
    from peftcli.progress import RichProgress

    show_step = RichProgress.on_step_end

    def press_ctrl_c_at_step_2(progress, args, state, control, **kwargs):
        show_step(progress, args, state, control, **kwargs)
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RichProgress, "on_step_end", press_ctrl_c_at_step_2)
    out = tmp_path / "out"
    result = peft("train", write_recipe(tiny_recipe(train={"max_steps": 6, "logging_steps": 100})), "-o", out)
    assert result.code == 130, result
    assert [step for step, _ in checkpoints.complete(out / "checkpoints")] == [2]
    report = json.loads((out / "report.json").read_text())
    assert report["stop_reason"] == "SIGINT at step 2 of 6"
    # The save the signal asked for holds the tokens of both steps, though step 2 did not log (step 1 did).
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == report["training"]["tokens"] > 0
    assert [entry["step"] for entry in state["log_history"]] == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_an_interrupted_bf16_run_resumes_to_the_uninterrupted_result(peft, recipe, uninterrupted, tmp_path):
    out = tmp_path / "out"
    report = interrupted(recipe, out)
    assert report["model"]["dtype"] == "bfloat16" and report["training"]["steps"] < STEPS
    # bfloat16 keeps 8 bits of mantissa: 1e-2 is a few roundings, far below what a lost
    # optimizer state, scheduler step or data position would change.
    assert_resumes_to_the_uninterrupted_result(peft, recipe, out, uninterrupted, tolerance=1e-2)
