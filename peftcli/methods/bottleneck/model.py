"""The bottleneck adapter tuner: finds the target modules and wraps them (peft's BaseTuner does the rest:
matching, trainable flags, saving and loading, enabling and disabling)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from peftcli.methods.bottleneck.layer import BottleneckLayer, BottleneckModule


class BottleneckModel(BaseTuner):
    prefix: str = "adapter_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}  # peftcli resolves target modules before peft sees them

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = BottleneckModule(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter trains only once it is made active
        self._replace_module(parent, target_name, new_module, target)
