"""PEFT methods: the recipe's `method` section becomes a peft config attached to the model.

One module per method family maps recipe fields to that family's peft config; this module
resolves target modules and dispatches on `method.name`."""

from __future__ import annotations

from peftcli.methods import lora
from peftcli.methods.targets import resolve_targets

CONFIG_BUILDERS = {"lora": lora.peft_config}


def peft_config(method, model):
    """The peft config for `method` on `model` (a real or meta-device model)."""
    return CONFIG_BUILDERS[method.name](method, resolve_targets(method.target_modules, model))


def attach(model, method):
    """`model` wrapped as a PeftModel with a fresh adapter; only the adapter is trainable."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(method, model))
