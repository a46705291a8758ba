"""Bottleneck adapters as a peft tuner: config.py (what is saved), layer.py (the math),
model.py (the wiring), shaped like peft's own tuners.

peft's `register_peft_method` only accepts members of its `PeftType` enum, which cannot be
extended, so `register` fills the same three registries under the plain string "BOTTLENECK".
peft looks methods up by `config.peft_type` in those dicts, so from then on get_peft_model,
save_pretrained, PeftModel.from_pretrained and disable_adapter work as for a built-in method.
"""

from __future__ import annotations

from peftcli.methods.bottleneck.config import PEFT_TYPE, BottleneckConfig
from peftcli.methods.bottleneck.model import BottleneckModel


DEFAULT_REDUCTION = 16  # bottleneck width = hidden size / 16 unless the recipe says otherwise (AdapterHub's default)


def peft_config(method, targets, model) -> BottleneckConfig:
    """The recipe's `adapter` method as this tuner's config (registered with peft on the way)."""
    register()
    hidden = model.config.hidden_size
    size = method.bottleneck_size or max(hidden // (method.reduction_factor or DEFAULT_REDUCTION), 1)
    return BottleneckConfig(task_type="CAUSAL_LM", target_modules=targets, variant=method.variant,
                            bottleneck_size=size, non_linearity=method.non_linearity, scaling=method.scaling,
                            hidden_size=hidden)


def register() -> None:
    """Make peft know the bottleneck method (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = BottleneckConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = BottleneckModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = BottleneckModel.prefix


__all__ = ["PEFT_TYPE", "BottleneckConfig", "BottleneckModel", "peft_config", "register"]
