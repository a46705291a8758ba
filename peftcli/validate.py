"""What `peft validate` checks beyond the schema, without loading any weight: the model's
modules (built on the meta device from its config), the data's columns, and the machine."""

from __future__ import annotations

import math
from pathlib import Path

from peftcli import data, methods, models
from peftcli.methods import full
from peftcli.methods.targets import wrapped_modules
from peftcli.recipe import Recipe
from peftcli.train import check_runtime, current_device, optimizer_steps


def check(recipe: Recipe) -> dict:
    """Raise a UserError for the first problem; return what was resolved on the way."""
    check_runtime(recipe, current_device())
    config = models.load_config(recipe.model.base, recipe.model.trust_remote_code)
    skeleton = models.build_empty(config, trust_remote_code=recipe.model.trust_remote_code)
    resolved: dict = {"architecture": type(skeleton).__name__}
    steps = recipe.train.max_steps
    if _is_local(recipe.data.train):
        rows = data.load_rows(recipe.data.train, field="data.train", on_error=recipe.data.on_error)
        resolved["format"] = data.detect_format(rows.column_names, recipe.data.format,
                                                where=f"data.train ({recipe.data.train})")
        resolved["train_rows"] = len(rows)
        held_out = math.ceil(len(rows) * (recipe.data.eval_fraction or 0))  # as train_test_split rounds it
        steps = optimizer_steps(len(rows) - held_out, recipe)
    if recipe.method.name == "full":
        modules = recipe.method.trainable_modules
        if modules != "all":
            full.selected_modules(skeleton, modules)
        resolved["trainable_modules"] = modules
        return resolved
    if recipe.method.name == "mixed":
        names = methods.mixed.adapter_names(recipe.method.components)
        configs = methods.component_configs(recipe.method, skeleton, steps=steps)
        resolved["target_modules"] = "; ".join(f"{name}: {', '.join(wrapped_modules(config, skeleton))}"
                                               for name, config in zip(names, configs))
        return resolved
    peft_config = methods.peft_config(recipe.method, skeleton, steps=steps)
    targets = wrapped_modules(peft_config, skeleton)
    if targets:
        resolved["target_modules"] = targets
    return resolved


def _is_local(spec: str) -> bool:
    return spec.startswith("builtin:") or Path(spec).is_file()
