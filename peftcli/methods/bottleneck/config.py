"""The bottleneck adapter's peft config: what adapter_config.json holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

PEFT_TYPE = "BOTTLENECK"  # not a member of peft's PeftType enum: peftcli registers it (see __init__.py)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby et al., 2019; parallel: He et al., 2022).

    Each target module gets `x ↦ up(f(down(x)))` with `down: d_in → bottleneck_size`,
    `up: bottleneck_size → d_out` and `up` zero at start, so training starts from the base model.
    - houlsby: in sequence after the module, `h = m(x) + s · adapter(m(x))`;
    - parallel: beside the module, `h = m(x) + s · adapter(x)`.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to wrap: names (suffix match) or a regex over full names."})
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules not to wrap, in the same forms."})
    variant: Literal["houlsby", "parallel"] = field(
        default="houlsby", metadata={"help": "houlsby: after the module, on its output; parallel: beside it, on its input."})
    bottleneck_size: int = field(default=64, metadata={"help": "Width of the bottleneck."})
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = field(
        default="relu", metadata={"help": "Activation between the down- and the up-projection."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the adapter's output."})
    hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Width of modules that are not linear layers (a whole block)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save with the adapter."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.variant not in ("houlsby", "parallel"):
            raise ValueError(f"variant must be houlsby or parallel, got {self.variant!r}")
        if self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be positive, got {self.bottleneck_size}")
