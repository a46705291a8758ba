"""LoRA and its variants: lora, qlora, dora, rslora.

LoRA (Hu et al., 2021): h = W x + (alpha / r) · B A x, with A: r×in, B: out×r, B = 0 at start.
rsLoRA scales by alpha/√r; DoRA adds a trained magnitude per output feature; QLoRA is LoRA
on a base loaded in 4-bit (Dettmers et al., 2023).

PiSSA and OLoRA start A and B from the base weights and subtract B·A from them, so the
adapter only means something on that rewritten base. To save an adapter that loads on the
unchanged base, peft converts it into a plain LoRA adapter of rank 2r from the adapter as it
was at the start; `attach` keeps that initial adapter and `save` does the conversion.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# recipe init → peft's init_lora_weights; LoftQ starts from the default and is fitted after wrapping (after_attach)
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
INITIAL_ADAPTER = "peftcli_initial_adapter"  # attribute of the PeftModel holding the start of a pissa/olora adapter


def peft_config(method, targets):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                      target_modules=targets, bias=method.bias, init_lora_weights=INITS[method.init],
                      use_rslora=method.name == "rslora" or getattr(method, "use_rslora", False),
                      use_dora=method.name == "dora" or getattr(method, "use_dora", False))


def quantization_config(method, compute_dtype, storage_dtype=None):
    """bitsandbytes 4-bit settings: the qlora method's, else NF4 with double quantization."""
    from peftcli.models import four_bit_config

    return four_bit_config(compute_dtype, getattr(method, "quant_type", "nf4"), getattr(method, "double_quant", True),
                           storage_dtype)


def after_attach(model, method) -> None:
    """Initialisations peft does after wrapping: LoftQ on the 4-bit base; keep the start of PiSSA/OLoRA."""
    from peft import get_peft_model_state_dict

    if method.init == "loftq":
        from peft import replace_lora_weights_loftq

        # LoftQ reads the unquantized weights from the base's safetensors, next to its config.
        replace_lora_weights_loftq(model, model_path=model.get_base_model().name_or_path)
    elif method.init in ("pissa", "olora"):
        initial = get_peft_model_state_dict(model)
        setattr(model, INITIAL_ADAPTER, {k: v.detach().clone().cpu() for k, v in initial.items()})


def converts_on_save(model) -> bool:
    return getattr(model, INITIAL_ADAPTER, None) is not None


def save_converted(model, directory: Path) -> None:
    """Save a PiSSA/OLoRA adapter as the plain LoRA adapter that gives the same model on the unchanged base."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as scratch:
        start = Path(scratch) / "initial"
        start.mkdir()
        save_file(getattr(model, INITIAL_ADAPTER), start / "adapter_model.safetensors")  # peft adds its config
        model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(start))
