"""IA³ (Liu et al., 2022): learned vectors rescale the keys, the values and the feed-forward
activations; h = l ⊙ (W x) on attention layers, h = W (l ⊙ x) on feed-forward layers, l = 1 at start."""

from __future__ import annotations

from peftcli.errors import UserError
from peftcli.methods.targets import preset_for


def peft_config(method, targets, model):
    from peft import IA3Config

    return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                     feedforward_modules=feedforward_modules(method, targets, model))


def feedforward_modules(method, targets, model) -> list[str] | str:
    """The targets whose input is rescaled: the feed-forward output layer, unless the recipe names them."""
    if method.feedforward_modules != "auto":
        if not isinstance(targets, list):
            return method.feedforward_modules  # peft checks them against the regex's matches
        outside = [m for m in method.feedforward_modules if m not in targets]
        if outside:
            raise UserError(f"feedforward_modules {outside} are not among the target modules {targets}",
                            where="method.feedforward_modules", hint="feed-forward modules are a subset of target_modules")
        return method.feedforward_modules
    if not isinstance(targets, list):
        raise UserError("with a regex for target_modules, name the feed-forward ones", where="method.feedforward_modules",
                        hint="e.g. feedforward_modules: [down_proj]")
    mlp_output = preset_for(model, "feedforward_modules: auto").mlp_output
    return [t for t in targets if t == mlp_output or mlp_output.endswith("." + t)]
