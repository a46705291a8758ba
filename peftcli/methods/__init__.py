"""PEFT methods: the recipe's `method` section becomes a peft config attached to the model.

One module per method family maps recipe fields to that family's peft config (lora,
ia3, prompt_learning, lycoris, adalora, vera, and the bottleneck adapter tuner);
targets.py resolves target modules. This module dispatches on `method.name` and holds what
every method shares: 4-bit loading, attaching, callbacks, saving and loading adapters."""

from __future__ import annotations

import os
from pathlib import Path

from peftcli.errors import UserError
from peftcli.methods import adalora, bottleneck, full, ia3, lora, lycoris, mixed, prompt_learning, vera
from peftcli.methods.targets import resolve_targets

LORA_FAMILY = ("lora", "qlora", "dora", "rslora")
PROMPT_LEARNING = ("prefix", "prompt", "p_tuning")


def peft_config(method, model, *, steps: int | None = None):
    """The peft config for `method` on `model` (a real or meta-device model); `steps`: the run's
    optimizer steps (AdaLoRA schedules its rank budget over them)."""
    name = method.name
    if name in PROMPT_LEARNING:
        return prompt_learning.peft_config(method, model)
    targets = resolve_targets(method, model)
    if name in LORA_FAMILY:
        return lora.peft_config(method, targets)
    if name == "ia3":
        return ia3.peft_config(method, targets, model)
    if name in ("loha", "lokr"):
        return lycoris.peft_config(method, targets)
    if name == "adalora":
        return adalora.peft_config(method, targets, steps)
    if name == "vera":
        return vera.peft_config(method, targets)
    if name == "adapter":
        return bottleneck.peft_config(method, targets, model)
    raise ValueError(f"no peft config for method {name!r}")  # the schema admits only the names above


def loading_options(recipe, dtype) -> dict:
    """Extra from_pretrained arguments: 4-bit quantization (QLoRA) on the one GPU, or nothing."""
    import torch

    if not recipe.model.load_in_4bit:
        return {}
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    storage = compute if recipe.distributed.strategy == "fsdp" else None  # FSDP shards float storage only
    local_gpu = int(os.environ.get("LOCAL_RANK", "0"))  # each process of a multi-GPU run loads onto its own GPU
    return {"quantization_config": lora.quantization_config(recipe.method, compute, storage),
            "device_map": {"": local_gpu}}


def attach(model, method, *, steps: int | None = None, empty: bool = False):
    """`model` wrapped as a PeftModel with a fresh adapter; only the adapter is trainable (with
    method full, the model itself with its chosen parameters trainable). `empty`: the adapter's
    tensors on the meta device, left uninitialised (peft's low_cpu_mem_usage), for a model that is
    only counted: a third faster to attach to a 70B skeleton's 560 projections."""
    from peft import get_peft_model

    if method.name == "full":
        return full.prepare(model, method)
    if method.name == "mixed":
        return mixed.attach(model, method.components, component_configs(method, model, steps=steps))
    config = peft_config(method, model, steps=steps)
    prepare_4bit_base(model)
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=empty)
    if method.name in LORA_FAMILY:
        lora.after_attach(peft_model, method)
    return peft_model


def prepare_4bit_base(model):
    """A 4-bit base as QLoRA trains it. peft's prepare_model_for_kbit_training upcasts the weights left
    unquantized (embeddings, norms, head) to fp32, which keeps fp16 training stable; a bf16 base keeps
    them in bf16, as bf16 has fp32's range: the upcast would double the residual stream's activations
    and the head's memory, and feed the projections fp32, which the fused LoRA path does not take."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) and upcasts_4bit_base(model.get_input_embeddings().weight.dtype):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def upcasts_4bit_base(dtype) -> bool:
    """Whether a 4-bit base whose unquantized weights are in `dtype` gets them upcast to fp32 (prepare_4bit_base)."""
    import torch

    return dtype == torch.float16


def component_configs(method, model, *, steps: int | None = None) -> list:
    """The peft config of each of a mixed method's components; a mistake names its position."""
    configs = []
    for index, component in enumerate(method.components):
        try:
            configs.append(peft_config(component, model, steps=steps))
        except UserError as err:
            where = err.where.replace("method.", f"method.{index}.", 1) if err.where else f"method.{index}"
            raise UserError(err.message, where=where, hint=err.hint) from err
    return configs


def callbacks(model, method) -> list:
    """Trainer callbacks a method needs while training (AdaLoRA's budget allocation)."""
    return [adalora.budget_callback(model)] if method.name == "adalora" else []


def base_was_rewritten(model) -> bool:
    """PiSSA and OLoRA subtract their initial adapter from the base weights."""
    return lora.converts_on_save(model)


def has_adapter(model) -> bool:
    """Whether `model` is a peft model (every method but full fine-tuning)."""
    return hasattr(model, "peft_config")


def base_model(model):
    """The transformers model inside a peft model (a PeftModel or a PeftMixedModel), or `model` itself."""
    if mixed.is_mixed(model):
        return model.base_model.model
    return model.get_base_model() if has_adapter(model) else model


def measures_base_first(model) -> bool:
    """Whether the base's eval loss must be measured before training, because no switch gives it back
    afterwards: PiSSA and OLoRA rewrite the base before training, full fine-tuning during it."""
    return base_was_rewritten(model) or not has_adapter(model)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, each counted once (peft's count for a peft model)."""
    if has_adapter(model):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())  # shared (tied) weights come once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(model, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, loadable onto the unchanged base; with full
    fine-tuning, the whole model as a transformers model folder (safetensors)."""
    if not has_adapter(model):
        model.save_pretrained(directory)
    elif mixed.is_mixed(model):
        mixed.save(model, directory)
    elif base_was_rewritten(model):
        lora.save_converted(model, directory)
    else:
        model.save_pretrained(directory)


def load_adapter(base_model, directory, **kwargs):
    """The saved adapter on `base_model`; built-in methods load the same with stock peft, the
    bottleneck adapter needs peftcli's registration first."""
    from peft import PeftModel

    if (manifest := mixed.read_manifest(directory)) is not None:
        return mixed.load(base_model, directory, manifest, **kwargs)
    bottleneck.register()
    return PeftModel.from_pretrained(base_model, str(directory), **kwargs)
