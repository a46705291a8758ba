"""The run directory: its layout, and the rules that keep an earlier run from being lost.

    <run>/adapter/       the trained adapter (stock peft loads it), tokenizer, model card
    <run>/model/         instead, with method full: the whole fine-tuned model (stock transformers loads it)
    <run>/recipe.yaml    the resolved recipe
    <run>/report.json    figures for programs; report.md and loss.png for people
    <run>/checkpoints/   resumable Trainer checkpoints
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import UserError

ARTIFACTS = ("adapter", "model", "checkpoints", "recipe.yaml", "report.json", "report.md", "loss.png")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    def holds_run(self) -> bool:
        return any((self.root / name).exists() for name in ARTIFACTS)

    def latest_checkpoint(self) -> Path | None:
        from transformers.trainer_utils import get_last_checkpoint

        return Path(found) if self.checkpoints.is_dir() and (found := get_last_checkpoint(self.checkpoints)) else None


def check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> RunDir:
    """Refuse, before any work, an output directory whose run would be lost or cannot resume."""
    run = RunDir(path)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other", hint="pick one")
    if path.exists() and not path.is_dir():
        raise UserError("the output path is a file, not a directory", where=str(path))
    if resume and run.latest_checkpoint() is None:
        raise UserError("there is no checkpoint to resume from", where=str(run.checkpoints),
                        hint="checkpoints are written every train.save_steps; start afresh without --resume")
    if run.holds_run() and not (overwrite or resume):
        raise UserError("the output directory already holds a run", where=str(path),
                        hint="pass --overwrite to replace it, --resume to continue it, or --output-dir elsewhere")
    return run


def clear_previous_run(run: RunDir) -> None:
    """For --overwrite: remove the artifacts a run writes, and nothing else in the folder."""
    for name in ARTIFACTS:
        target = run.root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
