"""Checkpoints that are complete or absent.

The Trainer writes each checkpoint (adapter weights, optimizer, scheduler, RNG states and
trainer_state.json with the step, hence the data position) into `checkpoints/.partial/`.
`PublishCheckpoints` then flushes it to disk and renames it to `checkpoints/checkpoint-N`
in one atomic step, so a crash or a second Ctrl-C mid-write leaves only `.partial/`, which
is never resumed from and is cleared by the next run. Checkpoints beyond
`train.save_total_limit` are retired the same way in reverse: renamed out of the
`checkpoint-N` names first, then deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STAGING = ".partial"  # where the Trainer writes a checkpoint before it is published
RETIRED = ".retired"  # where old checkpoints go to be deleted
STATE_FILE = "trainer_state.json"  # the Trainer writes it last
_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def staging(root: Path) -> Path:
    return root / STAGING


def complete(root: Path) -> list[tuple[int, Path]]:
    """The published checkpoints in `root` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := _NAME.match(path.name)) and (path / STATE_FILE).is_file()]
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1][1] if found else None


def clear_leftovers(root: Path) -> None:
    """Remove what an earlier run left half-done: a checkpoint being written, one being deleted."""
    for name in (STAGING, RETIRED):
        shutil.rmtree(root / name, ignore_errors=True)


def publish(written: Path, root: Path, keep: int | None) -> Path:
    """Move a checkpoint the Trainer has finished writing into `root`; keep the newest `keep`."""
    _flush(written)
    target = root / written.name
    written.rename(target)  # a run resumes from its newest checkpoint, so none newer is ever in the way
    _fsync(root)
    with contextlib.suppress(OSError):
        written.parent.rmdir()  # the staging folder, empty again
    if keep is not None:
        for _, old in complete(root)[:-keep]:
            _retire(old, root)
    return target


def _retire(path: Path, root: Path) -> None:
    graveyard = root / RETIRED
    graveyard.mkdir(exist_ok=True)
    doomed = graveyard / path.name
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)  # no longer a checkpoint-N: never mistaken for a complete one
    shutil.rmtree(doomed)
    graveyard.rmdir()


def _flush(folder: Path) -> None:
    """Force the checkpoint's bytes to disk before its name says it is complete."""
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PublishCheckpoints(TrainerCallback):
    """Publishes each checkpoint the Trainer saved into its staging folder (see the module's doc)."""

    def __init__(self, root: Path, keep: int | None):
        self.root, self.keep = root, keep

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:  # every process has written its part (RNG state) before the rename
            import torch.distributed as dist

            dist.barrier()
        if state.is_world_process_zero:
            publish(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", self.root, self.keep)
