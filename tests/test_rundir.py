"""The run directory's rules: one writer at a time, and a resume only with a recipe its checkpoint fits."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_recipe
from peftcli.errors import UserError
from peftcli.recipe import validate_recipe
from peftcli.rundir import LOCK, RunDir, check_resumable, locked


def test_a_second_train_on_a_busy_directory_is_refused_naming_the_owner(peft, write_recipe, tmp_path):
    out, recipe = tmp_path / "out", write_recipe(tiny_recipe())
    with locked(out):
        assert (out / LOCK).read_text().strip() == str(os.getpid())
        result = peft("train", recipe, "-o", out)
        assert result.code == 2
        assert f"another peft train (PID {os.getpid()}) is using this run directory" in result.output
        assert peft("train", recipe, "-o", out, "--dry-run").code == 0  # a dry run writes nothing: no lock needed
    assert not out.exists()  # the lock's folder was created for it and nothing else was written


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(dead.stdout)
    (out / "notes.txt").write_text("mine")
    with locked(out):
        assert (out / LOCK).read_text().strip() == str(os.getpid())
    assert not (out / LOCK).exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_that_cannot_start_leaves_no_folder_behind(peft, write_recipe, tmp_path):
    out = tmp_path / "new"
    result = peft("train", write_recipe(tiny_recipe(method={"target_modules": ["nope"]})), "-o", out)
    assert result.code == 2 and not out.exists()


@pytest.fixture
def finished_run(tmp_path):
    """A run directory as a run leaves it: its recipe and a complete checkpoint."""
    recipe = validate_recipe(tiny_recipe(), base_dir=ROOT)
    run = RunDir(tmp_path / "out")
    (run.checkpoints / "checkpoint-2").mkdir(parents=True)
    (run.checkpoints / "checkpoint-2" / "trainer_state.json").write_text("{}")
    run.recipe.write_text(recipe.to_yaml())
    return run


def test_resume_refuses_changes_the_checkpoint_cannot_follow_naming_them(peft, write_recipe, finished_run):
    result = peft("train", write_recipe(tiny_recipe()), "-o", finished_run.root, "--resume",
                  "--set", "method.r=8", "--set", "model.base=builtin:tiny-llama", "--set", "train.batch_size=2")
    assert result.code == 2
    output = " ".join(result.output.split())
    assert "the recipe differs from the run's in ways its checkpoint cannot follow" in output
    for change in ("method.r: 4 → 8", "model.base: 'builtin:tiny-gpt2' → 'builtin:tiny-llama'",
                   "train.batch_size: 4 → 2"):
        assert change in output
    assert "train.lr" not in output


def test_resume_allows_changes_that_leave_the_checkpoint_meaningful(finished_run):
    changed = tiny_recipe(name="renamed", train={"lr": 1e-5, "logging_steps": 3, "max_steps": 50, "save_steps": 5,
                                                 "on_nan": "skip_step"})
    check_resumable(finished_run, validate_recipe(changed, base_dir=ROOT))
    with pytest.raises(UserError, match=r"data.max_length: 256 → 128"):
        check_resumable(finished_run, validate_recipe(tiny_recipe(data={"max_length": 128}), base_dir=ROOT))


def test_resume_without_the_runs_recipe_is_refused(finished_run):
    finished_run.recipe.write_text("method: [unclosed\n")
    with pytest.raises(UserError, match="cannot read the run's recipe"):
        check_resumable(finished_run, validate_recipe(tiny_recipe(), base_dir=ROOT))
    finished_run.recipe.unlink()
    with pytest.raises(UserError, match="cannot read the run's recipe"):
        check_resumable(finished_run, validate_recipe(tiny_recipe(), base_dir=ROOT))
