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


def register() -> None:
    """Make peft know the bottleneck method (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = BottleneckConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = BottleneckModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = BottleneckModel.prefix


__all__ = ["PEFT_TYPE", "BottleneckConfig", "BottleneckModel", "register"]
