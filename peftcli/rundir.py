"""The run directory: its layout, and the rules that keep an earlier run from being lost.

    <run>/adapter/       the trained adapter (stock peft loads it), tokenizer, model card
    <run>/model/         instead, with method full: the whole fine-tuned model (stock transformers loads it)
    <run>/recipe.yaml    the resolved recipe
    <run>/report.json    figures for programs; report.md and loss.png for people
    <run>/checkpoints/   resumable Trainer checkpoints (complete ones only: peftcli.checkpoints)
    <run>/.peftcli.lock  held while a `peft train` uses the folder; holds that process's PID

Resuming continues from the newest complete checkpoint, and only with a recipe its
checkpoint can follow: the fields in RESUMABLE_CHANGES may differ from the run's
recipe.yaml, any other difference is refused by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from peftcli import distributed
from peftcli.errors import UserError

ARTIFACTS = ("adapter", "model", "checkpoints", "recipe.yaml", "report.json", "report.md", "loss.png")
LOCK = ".peftcli.lock"
# Recipe fields a resumed run may change: none alters the adapter's shape, the data, its
# order or the optimizer's state, so the checkpoint still means what it meant. A field not
# listed here (including any added later) must match, the safe default.
RESUMABLE_CHANGES = frozenset({
    "name", "output_dir", "train.epochs", "train.max_steps", "train.lr", "train.lr_scheduler",
    "train.warmup_ratio", "train.weight_decay", "train.max_grad_norm", "train.logging_steps",
    "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.gradient_checkpointing",
    "train.on_nan",
})


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
        """The newest complete checkpoint; one cut short while being written is never it."""
        from peftcli import checkpoints

        return checkpoints.latest(self.checkpoints)


@contextlib.contextmanager
def open_run(path: Path, *, recipe, overwrite: bool, resume: bool, lock: bool = True) -> Iterator[RunDir]:
    """The run directory, checked (check_output_dir, check_resumable) and, unless `lock` is
    False (a dry run writes nothing), held against other `peft train` processes meanwhile.

    Of the processes of a multi-process run, rank 0 alone checks and holds it: the others
    follow rank 0, which ends them all if it refuses."""
    if not distributed.is_main_process():
        yield RunDir(path)
        return
    with locked(path) if lock else contextlib.nullcontext():
        run = check_output_dir(path, overwrite=overwrite, resume=resume)
        if resume:
            check_resumable(run, recipe)
        yield run


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold `path` for this process: a lock file with our PID, locked with flock.

    The kernel releases the flock when its process dies, so a lock file left by a run that
    was killed is stale by construction and is taken over. A folder created here is removed
    again if the run wrote nothing into it."""
    _refuse_a_file(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK
    fd = _acquire(lock_file)
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when empty


def _acquire(lock_file: Path) -> int:
    """An open descriptor of `lock_file`, flock-ed by us and holding our PID."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"another peft train (PID {owner}) is using this run directory",
                            where=str(lock_file.parent),
                            hint="wait for it to finish or stop it, or pass --output-dir to run elsewhere") from None
        if lock_file.exists() and os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
            break  # still the file at that name, not one its last holder removed as we opened it
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_resumable(run: RunDir, recipe) -> None:
    """Refuse to resume with a recipe that differs from the run's in a field its checkpoint cannot follow."""
    try:
        saved = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the run's recipe to check that the checkpoint fits: {err}",
                        where=str(run.recipe), hint="start afresh with --overwrite") from err
    # Compared as written to recipe.yaml (a mixed method is written as its list of methods).
    before, now = _flatten(saved if isinstance(saved, dict) else {}), _flatten(yaml.safe_load(recipe.to_yaml()))
    changed = [key for key in sorted(before.keys() | now.keys())
               if key not in RESUMABLE_CHANGES and before.get(key) != now.get(key)]
    if changed:
        details = "; ".join(f"{key}: {before.get(key)!r} → {now.get(key)!r}" for key in changed)
        raise UserError(f"the recipe differs from the run's in ways its checkpoint cannot follow: {details}",
                        where=str(run.recipe),
                        hint="undo those changes to resume, or start a new run (--overwrite or --output-dir)")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_output_dir(path: Path, *, overwrite: bool, resume: bool) -> RunDir:
    """Refuse, before any work, an output directory whose run would be lost or cannot resume."""
    run = RunDir(path)
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other", hint="pick one")
    _refuse_a_file(path)
    if resume and run.latest_checkpoint() is None:
        raise UserError("there is no checkpoint to resume from", where=str(run.checkpoints),
                        hint="checkpoints are written every train.save_steps and when a run is interrupted; "
                             "start afresh without --resume")
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


def _refuse_a_file(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError("the output path is a file, not a directory", where=str(path))
