"""The bottleneck adapter layer: wraps one module and adds the adapter's output to it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from transformers.pytorch_utils import Conv1D

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckLayer(BaseTunerLayer):
    """Adapter weights keyed by adapter name, as peft's tuner layers keep them."""

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("adapter_variant", "adapter_scaling", "adapter_activation")

    def __init__(self, base_layer: nn.Module, hidden_size: int | None) -> None:
        self.base_layer = base_layer
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_activation = nn.ModuleDict()
        self.adapter_variant: dict[str, str] = {}
        self.adapter_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        # A linear layer says its widths; a whole block (the feed-forward block) maps the hidden size to itself.
        linear = isinstance(base, (nn.Linear, Conv1D))
        self.in_features, self.out_features = _get_in_out_features(base) if linear else (hidden_size, hidden_size)
        if self.in_features is None:
            raise TypeError(f"cannot tell the width of {type(base).__name__}; give the config a hidden_size")

    def update_layer(self, adapter_name: str, config) -> None:
        # Sequential adapters read the module's output, parallel ones its input.
        width_in = self.out_features if config.variant == "houlsby" else self.in_features
        self.adapter_variant[adapter_name] = config.variant
        self.adapter_scaling[adapter_name] = config.scaling
        self.adapter_down[adapter_name] = nn.Linear(width_in, config.bottleneck_size)
        self.adapter_activation[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.adapter_up[adapter_name] = nn.Linear(config.bottleneck_size, self.out_features)
        # The up-projection starts at zero: the adapted model starts as the base model.
        nn.init.zeros_(self.adapter_up[adapter_name].weight)
        nn.init.zeros_(self.adapter_up[adapter_name].bias)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise ValueError("bottleneck adapters are never merged")


class BottleneckModule(nn.Module, BottleneckLayer):
    """`base(x) + s · up(f(down(·)))` for each active adapter, on the module's output (houlsby) or input (parallel)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, config.hidden_size)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.adapter_down:
                continue
            down = self.adapter_down[name]
            source = result if self.adapter_variant[name] == "houlsby" else x
            hidden = self.adapter_activation[name](down(self._cast_input_dtype(source, down.weight.dtype)))
            result = result + self.adapter_scaling[name] * self.adapter_up[name](hidden).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
