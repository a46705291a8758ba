"""Several methods on one model (`method:` as a list): peft's mixed model (PeftMixedModel) holds
one adapter per method, all active and trained together; their updates add up, and their targets
may overlap.

peft cannot save a mixed model, so each adapter is saved as peft saves a single one, in its own
folder, beside a manifest that says it is a mixed adapter and in which order to load its parts:

    adapter/mixed.json        {"peft_type": "MIXED", "adapters": ["1-lora", "2-loha"], "methods": [...]}
    adapter/1-lora/           adapter_config.json + adapter_model.safetensors (stock peft loads it)
    adapter/2-loha/

Loading is `PeftMixedModel.from_pretrained` on the first part, `load_adapter` for the others, and
`set_adapter` of all of them (`load`). Adapter names start with their position: peft warns, and
may reinitialise weights, when a name is contained in its tuner's prefix (`lora` in `lora_`)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "mixed.json"
PEFT_TYPE = "MIXED"


def adapter_names(components) -> list[str]:
    return [f"{index}-{component.name}" for index, component in enumerate(components, 1)]


def attach(model, components, configs: list):
    """`model` as a PeftMixedModel with a fresh adapter per component (`configs` their peft configs),
    all of them active and trainable."""
    from peft import get_peft_model

    names = adapter_names(components)
    mixed = get_peft_model(model, configs[0], adapter_name=names[0], mixed=True)
    for name, config in zip(names[1:], configs[1:]):
        mixed.add_adapter(name, config)
    mixed.set_adapter(names)
    return mixed


def is_mixed(model) -> bool:
    from peft import PeftMixedModel

    return isinstance(model, PeftMixedModel)


def save(model, directory: Path) -> None:
    """Each adapter in its own folder, as peft saves one (safetensors), and the manifest."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    names = list(model.peft_config)
    for name in names:
        part = directory / name
        part.mkdir(parents=True, exist_ok=True)
        config = model.peft_config[name]
        config.save_pretrained(part)
        weights = get_peft_model_state_dict(model, adapter_name=name)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, part / "adapter_model.safetensors",
                  metadata={"format": "pt"})
    methods = [model.peft_config[n].peft_type.value for n in names]
    manifest = {"peft_type": PEFT_TYPE, "adapters": names, "methods": methods,
                "base_model_name_or_path": model.peft_config[names[0]].base_model_name_or_path}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load(base_model, directory: Path, manifest: dict, **kwargs):
    """The saved mixed adapter on `base_model`, every part active."""
    from peft import PeftMixedModel

    names = manifest["adapters"]
    model = PeftMixedModel.from_pretrained(base_model, str(Path(directory) / names[0]), adapter_name=names[0],
                                           **kwargs)
    for name in names[1:]:
        model.load_adapter(str(Path(directory) / name), adapter_name=name, **kwargs)
    model.set_adapter(names, inference_mode=not kwargs.get("is_trainable", False))
    return model
