"""The adapters in a folder (`peft adapters`): every run directory and adapter directory under it,
with what each one is (base, method, rank, size) and how well it did (final eval loss); runs of
method full are listed too, their whole model standing where the adapter would.

Each adapter is read the way `merge` and `generate` read it (`adapters.find_adapter`), its tensor
count from the safetensors header (no weight is loaded), and its run's figures from report.json.
A broken adapter is listed with its problem rather than stopping the scan."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from peftcli import adapters, models
from peftcli.errors import UserError

SKIPPED_FOLDERS = {"checkpoints", "merged"}  # a run's checkpoints hold adapters too; merged models are not adapters


@dataclass
class Entry:
    """One adapter as `peft adapters` lists it; None where it cannot be known."""

    name: str  # its folder, relative to the scanned one
    path: str
    base: str | None = None
    method: str | None = None
    rank: int | None = None
    trainable_params: int | None = None
    weights_bytes: int | None = None
    eval_loss: float | None = None
    date: str | None = None  # when its run started (report.json), else when its weights were written
    problem: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def scan(root: Path) -> list[Entry]:
    """Every run and adapter directory under `root` (itself included), by name."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("no such folder", where=str(root), hint="give a folder of runs, e.g. runs/")
    return sorted((describe(folder, root) for folder in adapter_folders(root)), key=lambda e: e.name)


def adapter_folders(root: Path):
    """Run directories and adapter directories; a run's own adapter/ counts once, as its run."""
    for current, subfolders, _files in os.walk(root):
        folder = Path(current)
        if adapters.is_adapter_path(folder) or adapters.full_run_model(folder):
            subfolders.clear()  # what lies inside an adapter or a run is part of it
            yield folder
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS)


def describe(folder: Path, root: Path) -> Entry:
    entry = Entry(name=str(folder.relative_to(root)) if folder != root else folder.name, path=str(folder))
    if (model := adapters.full_run_model(folder)) is not None:
        return _describe_full_run(entry, folder, model)
    try:
        source = adapters.find_adapter(folder)
    except UserError as err:
        entry.problem = err.message
        return entry
    weights = source.weight_files
    run_report = _report(source.run_dir)
    entry.base = builtin_name(source.trained_on or source.base)
    entry.method = source.method
    ranks = {rank(part["config"]) for part in source.parts}
    entry.rank = ranks.pop() if len(ranks) == 1 else None  # a mixed adapter's parts may differ
    entry.trainable_params = sum(tensor_elements(w) for w in weights)
    entry.weights_bytes = sum(w.stat().st_size for w in weights)
    entry.eval_loss = (run_report.get("eval") or {}).get("loss")
    entry.date = run_report.get("started_at") or datetime.fromtimestamp(
        weights[0].stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return entry


def _describe_full_run(entry: Entry, run: Path, model: Path) -> Entry:
    """A run of method full: its model stands where an adapter would (figures from its report)."""
    try:
        entry.base = builtin_name(adapters.run_model_section(run)["base"])
    except UserError as err:
        entry.problem = err.message
        return entry
    weights = sorted(model.glob("*.safetensors"))
    run_report = _report(run)
    entry.method = "full"
    entry.trainable_params = (run_report.get("params") or {}).get("trainable")
    entry.weights_bytes = sum(w.stat().st_size for w in weights)
    entry.eval_loss = (run_report.get("eval") or {}).get("loss")
    entry.date = run_report.get("started_at") or (datetime.fromtimestamp(
        weights[0].stat().st_mtime, timezone.utc).isoformat(timespec="seconds") if weights else None)
    return entry


def rank(config: dict) -> int | None:
    """The adapter's rank: r for the low-rank methods, AdaLoRA's final (target) rank; none for others."""
    value = config.get("target_r") if str(config.get("peft_type")).upper() == "ADALORA" else config.get("r")
    return value if isinstance(value, int) else None


def tensor_elements(weights: Path) -> int:
    """The number of values stored in a safetensors file, read from its header."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            count = 1
            for size in tensors.get_slice(key).get_shape():
                count *= size
            total += count
    return total


def builtin_name(base: str) -> str:
    """A built-in model's cache folder (where an adapter saved from it says its base is) as builtin:NAME."""
    path = Path(base)
    match = re.fullmatch(r"(.+)-[0-9a-f]+", path.name)
    if match and match.group(1) in models.BUILTINS and path.parent.resolve() == models.cache_root().resolve():
        return f"builtin:{match.group(1)}"
    return base


def _report(run_dir: Path | None) -> dict:
    path = run_dir / "report.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}
