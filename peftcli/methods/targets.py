"""Which modules an adapter wraps: the recipe's `target_modules` resolved against the model.

`target_modules` is `auto` (the method's preset for the architecture), a shorthand
(`attention`, `mlp`, `all-linear`), a list of names (a name matches every module whose full
name ends in it, as in peft: `attn.c_proj` is GPT-2's attention output, `c_proj` both), or a
regex matched against full module names. Every name must match a module; the error lists those
that exist."""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftcli.errors import UserError

LINEAR_ONLY = ("loha", "lokr")  # peft's LyCORIS layers take nn.Linear, not GPT-2's Conv1D


@dataclass(frozen=True)
class Preset:
    """The linear layers of one architecture's transformer block, by role."""

    attention: tuple[str, ...]  # every projection of the attention
    mlp: tuple[str, ...]  # every projection of the feed-forward block
    key_value: tuple[str, ...]  # the projections that produce keys and values (IA³ rescales them)
    attention_output: str
    mlp_output: str
    mlp_block: str = "mlp"  # the feed-forward block as one module (input and output: the hidden size)


LLAMA_LIKE = Preset(attention=("q_proj", "k_proj", "v_proj", "o_proj"), mlp=("gate_proj", "up_proj", "down_proj"),
                    key_value=("k_proj", "v_proj"), attention_output="o_proj", mlp_output="down_proj")
PRESETS = {
    "gpt2": Preset(attention=("c_attn", "attn.c_proj"), mlp=("c_fc", "mlp.c_proj"), key_value=("c_attn",),
                   attention_output="attn.c_proj", mlp_output="mlp.c_proj"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), LLAMA_LIKE),
    # Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj.
    "phi3": Preset(attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"), key_value=("qkv_proj",),
                   attention_output="o_proj", mlp_output="down_proj"),
}


def preset_for(model, wanted: str) -> Preset:
    model_type = getattr(model.config, "model_type", "?")
    preset = PRESETS.get(model_type)
    if preset is None:
        raise UserError(f"no '{wanted}' preset for model type '{model_type}'", where="method.target_modules",
                        hint=f"name the modules instead; linear modules of this model: {', '.join(linear_modules(model))}")
    return preset


def auto_targets(method, model) -> list[str]:
    """The method's default placement on this architecture."""
    if method.name == "ia3":
        preset = preset_for(model, "auto")
        return [*preset.key_value, preset.mlp_output]
    if method.name == "adapter":
        preset = preset_for(model, "auto")
        return [preset.attention_output, preset.mlp_output] if method.variant == "houlsby" else [preset.mlp_block]
    preset = PRESETS.get(getattr(model.config, "model_type", None))
    return [*preset.attention, *preset.mlp] if preset else all_linear(model)


def resolve_targets(method, model) -> list[str] | str:
    """`method.target_modules` as peft takes it: a list of names, or a regex string."""
    spec = method.target_modules
    if spec == "auto":
        names = auto_targets(method, model)
    elif spec == "attention":
        names = list(preset_for(model, spec).attention)
    elif spec == "mlp":
        names = list(preset_for(model, spec).mlp)
    elif spec == "all-linear":
        names = all_linear(model)
    elif isinstance(spec, str):
        check_regex(spec, method, model)
        return spec
    else:
        names = list(spec)
    check_names(names, method, model)
    return names


def candidates(method, model) -> dict[str, list[str]]:
    """The modules `method` can wrap, by short name → full names."""
    found = linear_modules(model, nn_linear_only=method.name in LINEAR_ONLY)
    if method.name == "adapter":  # bottleneck adapters also sit in sequence with or beside the feed-forward block
        preset = PRESETS.get(getattr(model.config, "model_type", None))
        block = preset.mlp_block if preset else "mlp"
        if blocks := block_modules(model).get(block):
            found.setdefault(block, []).extend(blocks)
    return found


def check_names(names: list[str], method, model) -> None:
    available = candidates(method, model)
    full_names = [full for fulls in available.values() for full in fulls]
    missing = [n for n in names if not any(full == n or full.endswith("." + n) for full in full_names)]
    if missing:
        raise UserError(f"target module(s) {missing} not in the model", where="method.target_modules",
                        hint=_listing(method, model, available))


def check_regex(pattern: str, method, model) -> None:
    available = candidates(method, model)
    if not any(re.fullmatch(pattern, full) for fulls in available.values() for full in fulls):
        raise UserError(f"the regex '{pattern}' matches no module (it must match a full name, "
                        f"e.g. {next(iter(available.values()))[0]})", where="method.target_modules",
                        hint=_listing(method, model, available))


def _listing(method, model, available: dict[str, list[str]]) -> str:
    text = f"{'linear ' if method.name != 'adapter' else ''}modules of this model: {', '.join(available)}"
    if method.name in LINEAR_ONLY:
        skipped = sorted(set(linear_modules(model)) - set(available))
        if skipped:
            text += f"; {method.name} cannot wrap {', '.join(skipped)} (not nn.Linear)"
    return text


def linear_modules(model, nn_linear_only: bool = False) -> dict[str, list[str]]:
    """Linear layers (nn.Linear and GPT-2's Conv1D) by short name → their full names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear,) if nn_linear_only else (torch.nn.Linear, Conv1D)
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return found


def block_modules(model) -> dict[str, list[str]]:
    """The modules one level inside each transformer block (attn, mlp, ln_1...), by short name → full names."""
    import torch

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    found: dict[str, list[str]] = {}
    if not lists:
        return found
    prefix, blocks = max(lists, key=lambda named: len(named[1]))  # the stack of transformer blocks
    for index, block in enumerate(blocks):
        for child, _ in block.named_children():
            found.setdefault(child, []).append(f"{prefix}.{index}.{child}")
    return found


def all_linear(model) -> list[str]:
    """The short names of every linear layer but the output layer (peft's all-linear)."""
    output = model.get_output_embeddings()
    return [short for short, fulls in linear_modules(model).items()
            if not all(model.get_submodule(full) is output for full in fulls)]


def wrapped_modules(peft_config, model) -> list[str]:
    """What the adapter wraps, each module once per block (`self_attn.q_proj`, not 32 layers of it)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if getattr(peft_config, "target_modules", None) is None:
        return []
    seen: dict[str, None] = {}
    for name, _ in model.named_modules():
        if name and check_target_module_exists(peft_config, name):
            seen[_within_block(name)] = None
    return list(seen)


def _within_block(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `self_attn.q_proj`: the name inside its numbered block."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[index + 1:]) if index is not None and index + 1 < len(parts) else name
