"""What `peft validate` checks beyond the schema, without loading any weight: the model's
modules (built on the meta device from its config), the data's columns, and the machine."""

from __future__ import annotations

from pathlib import Path

from peftcli import data, methods, models
from peftcli.methods.targets import linear_modules
from peftcli.recipe import Recipe
from peftcli.train import check_runtime, current_device


def check(recipe: Recipe) -> dict:
    """Raise a UserError for the first problem; return what was resolved on the way."""
    check_runtime(recipe, current_device())
    config = models.load_config(recipe.model.base, recipe.model.trust_remote_code)
    skeleton = models.build_empty(config)
    peft_config = methods.peft_config(recipe.method, skeleton)
    resolved = {"architecture": type(skeleton).__name__, "target_modules": concrete_targets(peft_config, skeleton)}
    if _is_local(recipe.data.train):
        rows = data.load_rows(recipe.data.train, field="data.train", on_error=recipe.data.on_error)
        resolved["format"] = data.detect_format(rows.column_names, recipe.data.format,
                                                where=f"data.train ({recipe.data.train})")
        resolved["train_rows"] = len(rows)
    return resolved


def concrete_targets(peft_config, model) -> list[str]:
    """The short names of the layers an adapter will wrap (all-linear skips the output layer)."""
    targets = getattr(peft_config, "target_modules", None)
    if targets is None:
        return []
    names = list(linear_modules(model))
    if targets == "all-linear":
        output = model.get_output_embeddings()
        return [n for n in names if not any(m is output for m in _named(model, n))]
    return sorted(set(targets), key=names.index)


def _named(model, short: str):
    return (m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == short)


def _is_local(spec: str) -> bool:
    return spec.startswith("builtin:") or Path(spec).is_file()
