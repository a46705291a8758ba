"""Which modules an adapter wraps: check the recipe's names against the model's linear layers."""

from __future__ import annotations

from peftcli.errors import UserError

SHORTHANDS = ("all-linear",)


def linear_modules(model) -> dict[str, list[str]]:
    """Linear layers (nn.Linear and GPT-2's Conv1D) by short name → their full names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return found


def resolve_targets(targets: list[str] | str, model) -> list[str] | str:
    """Targets as peft takes them; every explicit name must match a linear layer of the model."""
    if isinstance(targets, str) and targets in SHORTHANDS:
        return targets
    available = linear_modules(model)
    full_names = {full for names in available.values() for full in names}
    missing = [t for t in targets if t not in available and t not in full_names]
    if missing:
        raise UserError(f"target module(s) {missing} not in the model", where="method.target_modules",
                        hint=f"linear modules of this model: {', '.join(available)}")
    return list(targets)
