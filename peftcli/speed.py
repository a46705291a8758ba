"""Speed and memory: how a run trains fast within its memory.

`plan` decides once, from the recipe, the model and the data, what the run will do (shown by
`peft train --dry-run` and recorded by `peft bench`); `prepare` applies it to the model and
returns the Trainer's train dataset and collator. `train.profile` picks the defaults:

| setting (recipe key)                         | fast (default)                      | lean                     |
|----------------------------------------------|-------------------------------------|--------------------------|
| padding-free packing (`train.packing`)       | on with varlen attention            | same                     |
| varlen attention (`model.attn_implementation`) | on a GPU, Llama-family models      | same                     |
| liger kernels (`train.liger_kernels`)        | on a GPU when installed             | same                     |
| fused LoRA (`train.fused_lora`)              | on for LoRA with dropout 0          | same                     |
| checkpointing (`train.gradient_checkpointing`) | only layers that do not fit in `train.max_memory_gib` | every layer |
| activation offload (`train.offload_activations`) | off                             | on a GPU                 |
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from peftcli import fused_lora, methods, packing, varlen
from peftcli.errors import UserError

GIB = 2**30
# Families whose attention is plain causal softmax attention with the default scale, and whose
# layers pass position_ids and the collator's sequence bounds through to the attention function.
VARLEN_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
DEFAULT_MEMORY_FRACTION = 0.9  # of the GPU, when train.max_memory_gib is not set
ESTIMATE_MARGIN = 1.15  # activations measured on the GPU run a little above the count of saved tensors


@dataclass
class SpeedPlan:
    """What a run does for speed and memory, decided before training."""

    profile: str
    device: str
    packing: bool
    tokens_per_batch: int | None  # the token budget of a packed batch
    batches: list[list[int]] | None  # train example indices of each packed batch
    attention: str | None  # attn_implementation to set; None keeps the model's
    liger: bool
    fused_lora: bool
    layers: int
    checkpointed: int  # decoder layers whose activations are recomputed in backward
    offload: bool
    compile: bool
    memory_budget_gib: float | None = None
    estimated_peak_gib: float | None = None
    fused_layers: int = field(default=0)  # set by prepare

    def describe(self) -> dict:
        checkpointing = "off" if not self.checkpointed else f"{self.checkpointed}/{self.layers} layers"
        return {
            "profile": self.profile,
            "packing": f"on, {self.tokens_per_batch:,} tokens per batch" if self.packing else "off",
            "attention": self.attention or "model default",
            "liger_kernels": self.liger,
            "fused_lora": f"{self.fused_layers} layers" if self.fused_layers else self.fused_lora,
            "gradient_checkpointing": checkpointing + (", offloaded to CPU" if self.offload else ""),
            "compile": self.compile,
            "memory_budget_gib": None if self.memory_budget_gib is None else round(self.memory_budget_gib, 1),
            "estimated_peak_gib": None if self.estimated_peak_gib is None else round(self.estimated_peak_gib, 1),
        }


def plan(recipe, model, train_data, device: str) -> SpeedPlan:
    """Resolve every `auto` of the recipe's speed settings for this model, data and machine."""
    t = recipe.train
    base = methods.base_model(model)
    lengths = [len(ids) for ids in train_data["input_ids"]]
    attention = recipe.model.attn_implementation
    use_varlen = _varlen_possible(attention, base, device)
    packed = _resolve_packing(t.packing, base, use_varlen)
    if use_varlen and (packed or attention == "varlen"):
        attention = varlen.NAME
    budget = None
    if packed:
        budget = t.max_tokens_per_batch or packing.default_budget(lengths, t.batch_size)
        if budget < max(lengths):
            raise UserError(f"train.max_tokens_per_batch ({budget}) is below the longest example ({max(lengths)} tokens)",
                            where="train.max_tokens_per_batch", hint="raise it, or lower data.max_length")
    liger = _resolve_liger(t.liger_kernels, base, device)
    layers = len(decoder_layers(base))
    speed = SpeedPlan(
        profile=t.profile, device=device, packing=packed, tokens_per_batch=budget,
        batches=packing.token_budget_batches(lengths, budget) if packed else None,
        attention=None if attention == "auto" else attention,
        liger=liger, fused_lora=_resolve_fused_lora(t.fused_lora, recipe.method),
        layers=layers, checkpointed=0, offload=_resolve_offload(t.offload_activations, t.profile, device),
        compile=t.compile)
    tokens = budget if packed else t.batch_size * max(lengths)
    _choose_checkpointing(speed, t, base, model, tokens)
    return speed


def prepare(speed: SpeedPlan, model, train_data, pad_collator):
    """Apply the plan to the model (a PeftModel, or a plain one being evaluated); return the train
    dataset and the collator for the Trainer."""
    base = methods.base_model(model)
    base.config.use_cache = False  # a cache in training wastes memory and turns off packed-sequence masks
    if speed.attention:
        if speed.attention == varlen.NAME:
            varlen.register()
        base.set_attn_implementation(speed.attention)
    if speed.liger:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, None)
    speed.fused_layers = fused_lora.install(model) if speed.fused_lora else 0
    _apply_checkpointing(base, speed)
    if speed.compile:
        for layer in decoder_layers(base):
            layer.compile(dynamic=True)
    if not speed.packing:
        return train_data, pad_collator
    from datasets import Dataset

    return Dataset.from_dict({"pack": speed.batches}), packing.PackedCollator(train_data, pad_collator)


def decoder_layers(base) -> list:
    """The repeated blocks that gradient checkpointing wraps, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


# ---------------------------------------------------------------------------------------
# Resolving each setting


def supports_packing(base) -> bool:
    """Models on transformers' attention interface build their masks from position_ids, so packed
    examples stay apart under sdpa, eager and flex attention as under varlen."""
    return (getattr(type(base), "_supports_attention_backend", False)
            and "position_ids" in inspect.signature(base.forward).parameters)


def _resolve_packing(setting, base, use_varlen: bool) -> bool:
    """auto packs only under varlen attention: sdpa and eager compute a packed row's attention
    over the whole row (masked), which costs more than the padding it saves."""
    if setting == "auto":
        return use_varlen and supports_packing(base)
    if setting and not supports_packing(base):
        raise UserError(f"{type(base).__name__} cannot keep packed examples apart", where="train.packing",
                        hint="set train.packing: false (or auto)")
    return setting


def _varlen_possible(setting: str, base, device: str) -> bool:
    """Whether the run can (auto) or must (varlen) use varlen attention."""
    if setting == "varlen":
        if not varlen.available():
            raise UserError("varlen attention needs a CUDA GPU and torch.nn.attention.varlen (torch 2.9+)",
                            where="model.attn_implementation", hint="use auto or sdpa")
        return True
    return (setting == "auto" and device == "cuda" and varlen.available()
            and base.config.model_type in VARLEN_FAMILIES and not getattr(base.config, "attention_dropout", 0.0))


def liger_supported(base) -> bool:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return base.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def _resolve_liger(setting, base, device: str) -> bool:
    if setting == "auto":
        return device == "cuda" and liger_supported(base)
    if setting and (device != "cuda" or not liger_supported(base)):
        raise UserError(f"liger kernels need a CUDA GPU, the liger-kernel package and a supported architecture "
                        f"({base.config.model_type} here)", where="train.liger_kernels", hint="set it to auto or false")
    return setting


def _resolve_fused_lora(setting, method) -> bool:
    """Layers the fused path cannot compute (dropout, DoRA, other methods) keep peft's forward at run time;
    with dropout on every layer there is nothing to fuse."""
    without_dropout = getattr(method, "dropout", 0) == 0
    if setting == "auto":
        return without_dropout
    if setting and not without_dropout:
        raise UserError("the fused LoRA layer computes LoRA without dropout", where="train.fused_lora",
                        hint="set method.dropout: 0, or train.fused_lora: auto")
    return setting


def _resolve_offload(setting, profile: str, device: str) -> bool:
    """Offloading moves GPU activations to CPU memory; on a CPU there is nothing to move."""
    wanted = profile == "lean" if setting == "auto" else setting
    return wanted and device == "cuda"


# ---------------------------------------------------------------------------------------
# Gradient checkpointing, by profile and memory


def _choose_checkpointing(speed: SpeedPlan, t, base, model, tokens: int) -> None:
    """lean: every layer. fast: none, or as few layers as keep the estimated peak within the budget."""
    fixed = _fixed_bytes(model)
    if speed.device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / GIB
        speed.memory_budget_gib = t.max_memory_gib or DEFAULT_MEMORY_FRACTION * total

    activation_bytes = base.get_input_embeddings().weight.element_size()  # the compute dtype, 4-bit bases too

    def peak(checkpointed: int) -> float:
        return estimate_peak_bytes(base.config, tokens=tokens, layers=speed.layers, checkpointed=checkpointed,
                                   offload=speed.offload, liger=speed.liger, fixed_bytes=fixed,
                                   dtype_bytes=activation_bytes) / GIB

    if t.gradient_checkpointing != "auto":
        speed.checkpointed = speed.layers if t.gradient_checkpointing else 0
    elif t.profile == "lean":
        speed.checkpointed = speed.layers
    elif speed.memory_budget_gib is None:  # on a CPU nothing is worth recomputing
        speed.checkpointed = 0
    else:
        speed.checkpointed = fewest_checkpointed(peak, speed.layers, speed.memory_budget_gib)
    speed.offload = speed.offload and speed.checkpointed > 0
    speed.estimated_peak_gib = peak(speed.checkpointed) if speed.device == "cuda" else None


def fewest_checkpointed(peak, layers: int, budget_gib: float) -> int:
    """The fewest checkpointed layers whose estimated `peak(k)` GiB is within the budget; all when none is."""
    return next((k for k in range(layers + 1) if peak(k) <= budget_gib), layers)


def _fixed_bytes(model) -> int:
    """Weights, and for trainable parameters their gradients and AdamW's two float32 moments."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * (p.element_size() + 8)
    return total


def estimate_peak_bytes(config, *, tokens: int, layers: int, checkpointed: int, offload: bool, liger: bool,
                        fixed_bytes: int, dtype_bytes: int = 2) -> int:
    """Peak GPU memory of a LoRA training step on `tokens` tokens, from the tensors autograd keeps.

    Per token and decoder layer a layer keeps (fused LoRA, liger kernels): both norm inputs and
    outputs (4 hidden), q, k, v and the attention output, the gate, up and activated MLP
    projections (3 intermediate). A checkpointed layer keeps only its input (none on the GPU when
    offloaded) and recomputes the rest; the layer being back-propagated holds its activations and
    their gradients. Without liger the norms keep float32 copies and the loss holds float32 logits."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    per_layer = dtype_bytes * (4 * hidden + 2 * heads * head_dim + 2 * kv + 3 * intermediate)
    per_layer *= ESTIMATE_MARGIN * (1.0 if liger else 1.6)
    kept = (layers - checkpointed) * per_layer + (0 if offload else checkpointed * dtype_bytes * hidden)
    working = 2 * per_layer
    loss = 2 * dtype_bytes * hidden if liger else 10 * config.vocab_size  # liger never holds whole logits
    return int(fixed_bytes + tokens * (kept + working + loss))


def _apply_checkpointing(base, speed: SpeedPlan) -> None:
    """Checkpoint the first `checkpointed` decoder layers: the last ones are back-propagated first, so
    keeping their activations needs no recompute at the start of backward."""
    if not speed.checkpointed:
        return
    base.activation_checkpointing_enable({"use_reentrant": False}, offload=speed.offload)
    base.disable_input_require_grads()  # non-reentrant checkpointing needs no gradient at the embeddings
    for layer in decoder_layers(base)[speed.checkpointed:]:
        layer.gradient_checkpointing = False
