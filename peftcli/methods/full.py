"""Full fine-tuning: no adapter; the model's own parameters train, all of them or those of the
modules the recipe names (`trainable_modules`), the rest frozen. The baseline the PEFT methods
are compared with on the same recipe, data and report; the run saves the whole model."""

from __future__ import annotations

from peftcli.errors import UserError


def prepare(model, method):
    """`model` with only the chosen parameters trainable."""
    if method.trainable_modules == "all":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    for module in selected_modules(model, method.trainable_modules):
        module.requires_grad_(True)  # a weight tied to a frozen module's (GPT-2's lm_head and wte) trains too
    return model


def selected_modules(model, names: list[str]) -> list:
    """The modules `names` match (a name matches every module whose full name is or ends in it);
    every name must match one."""
    modules = dict(model.named_modules())
    found = {name: [m for full, m in modules.items() if full == name or full.endswith("." + name)] for name in names}
    missing = [name for name, matched in found.items() if not matched]
    if missing:
        raise UserError(f"trainable module(s) {missing} not in the model", where="method.trainable_modules",
                        hint=f"modules of this model: {', '.join(module_names(model))}")
    return [m for matched in found.values() for m in matched]


def module_names(model) -> list[str]:
    """Names worth suggesting: the model's top-level parts and the parts of each block, once each."""
    from peftcli.methods.targets import block_modules

    seen: dict[str, None] = {}
    for full, _ in model.named_modules():
        if full and "." not in full.removeprefix("model.").removeprefix("transformer."):
            seen[full.rsplit(".", 1)[-1]] = None
    for name in block_modules(model):
        seen[name] = None
    return list(seen)
