"""Checkpoints appear complete or not at all; rotation retires only complete checkpoints."""

import json

from peftcli import checkpoints
from peftcli.rundir import RunDir


def written(root, step, *, complete=True):
    """A checkpoint as the Trainer leaves it in the staging folder (trainer_state.json last)."""
    folder = checkpoints.staging(root) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "optimizer.pt").write_bytes(b"state")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_checkpoint_is_published_by_rename_and_the_staging_folder_goes(tmp_path):
    root = tmp_path / "checkpoints"
    published = checkpoints.publish(written(root, 2), root, keep=None)
    assert published == root / "checkpoint-2"
    assert (published / "optimizer.pt").read_bytes() == b"state"
    assert not checkpoints.staging(root).exists()
    assert RunDir(tmp_path).latest_checkpoint() == published


def test_only_complete_published_checkpoints_count(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.publish(written(root, 2), root, keep=None)
    written(root, 4, complete=False)  # a crash while the Trainer wrote it
    (root / "checkpoint-6").mkdir()  # a folder named like a checkpoint, without the Trainer's state
    assert checkpoints.complete(root) == [(2, root / "checkpoint-2")]
    assert RunDir(tmp_path).latest_checkpoint() == root / "checkpoint-2"
    checkpoints.clear_leftovers(root)
    assert not checkpoints.staging(root).exists()
    assert (root / "checkpoint-6").is_dir()  # not ours to judge: left alone


def test_rotation_keeps_the_newest_and_touches_nothing_else(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "checkpoint-best").mkdir()
    for step in (2, 4, 6, 8, 10):  # numeric order, not text order: 10 is the newest
        checkpoints.publish(written(root, step), root, keep=2)
    assert [step for step, _ in checkpoints.complete(root)] == [8, 10]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-8", "checkpoint-best", "notes.txt"]


def test_a_retirement_cut_short_never_leaves_a_half_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.publish(written(root, 2), root, keep=None)
    half_deleted = root / checkpoints.RETIRED / "checkpoint-0"  # a crash during an old checkpoint's deletion
    half_deleted.mkdir(parents=True)
    (half_deleted / "trainer_state.json").write_text("{}")
    assert checkpoints.latest(root) == root / "checkpoint-2"
    checkpoints.clear_leftovers(root)
    assert not (root / checkpoints.RETIRED).exists()
