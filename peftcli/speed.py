"""Speed and memory: how a run trains fast within its memory.

`plan` decides once, from the recipe, the model and the data, what the run will do (shown by
`peft train --dry-run` and recorded by `peft bench`); `prepare` applies it to the model and
returns the Trainer's train dataset and collator. `train.profile` picks the defaults:

| setting (recipe key)                         | fast (default)                      | lean                     |
|----------------------------------------------|-------------------------------------|--------------------------|
| padding-free packing (`train.packing`)       | on with varlen attention            | same                     |
| micro-batches per packed batch (`train.micro_batches`) | 1, halved until the step fits `train.max_memory_gib` | also until activations ≤ ¼ of the model's 16-bit memory |
| varlen attention (`model.attn_implementation`) | on a GPU, Llama-family models      | same                     |
| liger kernels (`train.liger_kernels`)        | on a GPU when installed             | same                     |
| fused LoRA (`train.fused_lora`)              | on for LoRA with dropout 0          | same                     |
| checkpointing (`train.gradient_checkpointing`) | only layers that do not fit in `train.max_memory_gib` | every layer |
| activation offload (`train.offload_activations`) | when it spares recomputing layers, or nothing else fits | on a GPU |
| input embeddings in CPU memory (`train.offload_embeddings`) | off                  | on a GPU, untied, frozen |

Within the memory budget (`train.max_memory_gib`, else `default_budget_gib`: 24 GiB for models up to
16 GiB, 1.5× the model beyond, a 4-bit base's share of it, within 90% of the GPU) fast gives up speed step by
step, cheapest first: checkpointed layers (their inputs offloaded where that spares recomputing some),
then smaller micro-batches.
The layers to checkpoint are chosen with params' memory estimate (the one `peft count-params`
shows), made for the run's largest step through these settings; `estimate_on_a_gpu` resolves the
same settings as a CUDA GPU would, for count-params.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field, replace

from peftcli import activation_offload, cpu_embedding, fused_lora, methods, packing, params, varlen
from peftcli.errors import UserError

GIB = 2**30
# Families whose attention is plain causal softmax attention with the default scale, and whose
# layers pass position_ids and the collator's sequence bounds through to the attention function.
VARLEN_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Families whose decoder layer ends with `residual + mlp.down_proj(...)`: nothing the layer keeps for
# backward is computed from the down projection's output.
RESIDUAL_LAST_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The memory budget when train.max_memory_gib is not set: activations up to FAST_ACTIVATION_SHARE of the
# model's memory in 16-bit beyond it, and at least FAST_BUDGET_FLOOR_GIB; a 4-bit base's share of that;
# within DEFAULT_MEMORY_FRACTION of the GPU. A fixed budget, not the GPU's, so that a recipe plans alike on
# every GPU it fits; see default_budget_gib.
FAST_ACTIVATION_SHARE = 0.5
FAST_BUDGET_FLOOR_GIB = 24
DEFAULT_MEMORY_FRACTION = 0.9
# lean splits packed batches until the activations' peak is at most this share of the model's memory in
# 16-bit (sixteen_bit_model_bytes)
LEAN_ACTIVATION_SHARE = 0.25


@dataclass
class SpeedPlan:
    """What a run does for speed and memory, decided before training."""

    profile: str
    device: str
    packing: bool
    tokens_per_batch: int | None  # the token budget of a packed micro-batch
    batches: list[list[int]] | None  # train example indices of each packed micro-batch
    attention: str | None  # attn_implementation to set; None keeps the model's
    liger: bool
    fused_lora: bool
    layers: int
    checkpointed: int  # decoder layers whose activations are recomputed in backward
    offload: bool
    offload_embeddings: bool
    compile: bool
    memory_budget_gib: float | None = None
    estimated_peak_gib: float | None = None  # on a GPU: the estimate the checkpointing was chosen by
    memory: params.Estimate | None = None  # the run's memory estimate (report.json has it on any device)
    micro_batches: int = 1  # packed micro-batches per batch, their gradients accumulated
    liger_options: dict = field(default_factory=dict)  # liger_kernel_config, for speed.prepare and the Trainer
    fused_layers: int = field(default=0)  # set by prepare

    def describe(self) -> dict:
        checkpointing = "off" if not self.checkpointed else f"{self.checkpointed}/{self.layers} layers"
        return {
            "profile": self.profile,
            "packing": self._packing(),
            "attention": self.attention or "model default",
            "liger_kernels": self.liger,
            "fused_lora": f"{self.fused_layers} layers" if self.fused_layers else self.fused_lora,
            "gradient_checkpointing": checkpointing + (", offloaded to CPU" if self.offload else ""),
            "input_embeddings": "CPU memory" if self.offload_embeddings else "GPU memory",
            "compile": self.compile,
            "memory_budget_gib": None if self.memory_budget_gib is None else round(self.memory_budget_gib, 1),
            "estimated_peak_gib": None if self.estimated_peak_gib is None else round(self.estimated_peak_gib, 1),
        }

    def _packing(self) -> str:
        if not self.packing:
            return "off"
        if self.micro_batches == 1:
            return f"on, {self.tokens_per_batch:,} tokens per batch"
        return f"on, {self.micro_batches} micro-batches of {self.tokens_per_batch:,} tokens per batch"


def plan(recipe, model, train_data, device: str) -> SpeedPlan:
    """Resolve every `auto` of the recipe's speed settings for this model, data and machine."""
    t = recipe.train
    base = methods.base_model(model)
    lengths = [len(ids) for ids in train_data["input_ids"]]
    machine = Machine.here(device, base)
    path = resolve_path(recipe, base, machine)
    skeleton, layers = params.build_skeleton(recipe), len(decoder_layers(base))
    whole = t.max_tokens_per_batch or packing.default_budget(lengths, t.batch_size)

    def planned(micro: int):
        batches = packing.token_budget_batches(lengths, whole // micro) if path.packing else None
        step = _run_step(path, lengths, batches, t.batch_size, device)
        return (*fit_checkpointing(lambda p: params.estimate(recipe, skeleton, batch_size=t.batch_size,
                                                              seq_len=max(lengths), step=step, path=p),
                                   path, t, machine, layers), batches)

    micro, (memory, budget_gib, batches) = fit_micro_batches(t, path, whole, max(lengths), planned)
    attention = recipe.model.attn_implementation
    return SpeedPlan(
        profile=t.profile, device=device, packing=path.packing, tokens_per_batch=whole // micro if path.packing else None,
        batches=batches, attention=varlen.NAME if path.attention == "varlen" else (None if attention == "auto" else attention),
        liger=path.liger_kernels, fused_lora=path.fused_lora, layers=layers, checkpointed=memory.checkpointed,
        offload=memory.path.offload_activations, offload_embeddings=path.offload_embeddings, compile=t.compile,
        memory_budget_gib=budget_gib, estimated_peak_gib=memory.peak() / GIB if device == "cuda" else None,
        memory=memory, micro_batches=micro, liger_options=liger_kernel_config(model) if path.liger_kernels else {})


def estimate_on_a_gpu(recipe, skeleton, *, batch_size: int, seq_len: int) -> params.Estimate:
    """The memory of `recipe` as `peft train` would run it on a CUDA GPU (Machine.assumed_gpu), every
    example `seq_len` tokens long: packed into the token budget (in micro-batches), or `batch_size` full rows."""
    t = recipe.train
    base = methods.base_model(skeleton.model)
    machine = Machine.assumed_gpu(base)
    path = resolve_path(recipe, base, machine)
    layers = len(decoder_layers(base))
    whole = t.max_tokens_per_batch or batch_size * seq_len  # packing.default_budget of examples all seq_len long

    def planned(micro: int):
        step = (params.Step(1, whole // micro, masked=path.attention != "varlen") if path.packing
                else params.Step(batch_size, seq_len))
        return fit_checkpointing(lambda p: params.estimate(recipe, skeleton, batch_size=batch_size, seq_len=seq_len,
                                                          step=step, path=p), path, t, machine, layers)

    _, (memory, budget_gib) = fit_micro_batches(t, path, whole, seq_len, planned)
    if t.profile == "fast" and t.max_memory_gib is None:
        memory.notes.append(f"fast plans within {budget_gib:.1f} GiB, the model's default budget (or 90% of a smaller "
                            "GPU); set train.max_memory_gib to plan within another")
    return memory


def fit_micro_batches(t, path: params.SpeedPath, budget: int, longest: int, planned) -> tuple[int, tuple]:
    """The micro-batches per packed batch of `budget` tokens, and `planned(micro)` (its estimate first) for them.

    The fewest (1, 2, 4, ...) whose estimate fits the memory budget, every layer checkpointed if need be:
    halving a step halves its activations but costs speed (more, smaller steps). lean also splits until
    the activations stay within LEAN_ACTIVATION_SHARE of the memory the model takes in 16-bit (weights,
    adapter, optimizer; sixteen_bit_model_bytes), where they are a large part of the peak. Never so many
    that one micro-batch cannot hold the longest example; unpacked runs are not split (their batches
    split with batch_size and grad_accum)."""
    if not path.packing:
        if t.micro_batches not in ("auto", 1):
            raise UserError("micro-batches split a packed batch, and this run does not pack",
                            where="train.micro_batches", hint="set train.packing: true, or lower batch_size and raise grad_accum")
        return 1, planned(1)
    if budget < longest:
        raise UserError(f"train.max_tokens_per_batch ({budget}) is below the longest example ({longest} tokens)",
                        where="train.max_tokens_per_batch", hint="raise it, or lower data.max_length")
    if t.micro_batches != "auto":
        if budget // t.micro_batches < longest:
            raise UserError(f"{t.micro_batches} micro-batches of {budget:,} tokens cannot hold the longest example "
                            f"({longest} tokens)", where="train.micro_batches",
                            hint="use fewer micro-batches, or raise train.max_tokens_per_batch")
        return t.micro_batches, planned(t.micro_batches)
    micro, result = 1, planned(1)
    while budget // (2 * micro) >= longest and _worth_splitting(t.profile, *result[:2]):
        micro *= 2
        result = planned(micro)
    return micro, result


def _worth_splitting(profile: str, memory: params.Estimate, budget_gib: float | None) -> bool:
    if over_budget(memory, budget_gib):
        return True
    return profile == "lean" and memory.peak() - memory.static_bytes() > LEAN_ACTIVATION_SHARE * sixteen_bit_model_bytes(memory)


def sixteen_bit_model_bytes(memory: params.Estimate) -> int:
    """The model's memory in 16-bit (weights, adapter, optimizer), for a 4-bit base too: what lean's
    micro-batches and fast's default budget (default_budget_gib) are measured against. For lean, what a
    micro-batch costs in time follows the parameters it goes through (each weight read, its kernels
    launched and, on a 4-bit base, dequantized once more per micro-batch), not their storage. Measured
    on the 8B QLoRA workload (H100, lean): 1 × 8,192 tokens 10,027 tok/s at 6.36 GiB; 2 × 4,096 tokens
    (a quarter of the 4-bit model's own memory) 6,614 at 5.64."""
    return memory.static_bytes("adapter" if memory.selected == "adapter_4bit" else None)


def over_budget(memory: params.Estimate, budget_gib: float | None) -> bool:
    return budget_gib is not None and memory.peak() / GIB > budget_gib


def _run_step(path, lengths: list[int], batches, batch_size: int, device: str) -> params.Step:
    """The largest step of the run: its fullest packed batch, or `batch_size` rows padded to the longest
    example (to a multiple of 8 on a GPU, as the collator pads); sdpa gets a mask when rows are padded or packed."""
    if batches:
        largest = max(sum(lengths[i] for i in batch) for batch in batches)
        return params.Step(1, largest, masked=path.attention != "varlen")
    longest = max(lengths)
    if device == "cuda":
        longest = -(-longest // 8) * 8
    rows = min(batch_size, len(lengths))
    return params.Step(rows, longest, masked=path.attention != "varlen" and min(lengths) < longest)


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

        apply_liger_kernel(model, speed.liger_options)
    speed.fused_layers = fused_lora.install(model) if speed.fused_lora else 0
    checkpoint_layers(base, speed.checkpointed, offload=speed.offload, compiled=speed.compile)
    if speed.offload_embeddings:
        cpu_embedding.offload(base)
    if speed.compile:
        for layer in decoder_layers(base):
            layer.compile(dynamic=True)
    if not speed.packing:
        return train_data, pad_collator
    from datasets import Dataset

    return Dataset.from_dict({"pack": speed.batches}), packing.PackedCollator(train_data, pad_collator)


def liger_kernel_config(model) -> dict:
    """liger's options for this model (PreTrainedModel or PeftModel): liger swaps the forward of each decoder
    layer's `mlp` for its SwiGLU, written for the model's own MLP; where an adapter wraps that block (the
    parallel bottleneck adapter), the block keeps its own forward."""
    layers = decoder_layers(methods.base_model(model))
    return {"swiglu": False} if any(_adapter_wraps_mlp(layer) for layer in layers) else {}


def own_mlp(layer):
    """The decoder layer's MLP block, None where an adapter wraps the block (its output may feed the adapter)."""
    mlp = getattr(layer, "mlp", None)
    return None if _adapter_wraps_mlp(layer) or not hasattr(mlp, "down_proj") else mlp


def _adapter_wraps_mlp(layer) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(getattr(layer, "mlp", None), BaseTunerLayer)


def decoder_layers(base) -> list:
    """The repeated blocks that gradient checkpointing wraps, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


# ---------------------------------------------------------------------------------------
# Resolving each setting


@dataclass(frozen=True)
class Machine:
    """What the speed settings depend on besides the recipe and the model."""

    device: str
    varlen: bool  # torch's varlen attention runs here
    liger: bool  # liger-kernel is installed here and patches this model's architecture
    memory_gib: float | None  # the GPU's memory; None when unknown or on a CPU

    @classmethod
    def here(cls, device: str, base) -> Machine:
        if device != "cuda":
            return cls(device, False, False, None)
        import torch

        return cls(device, varlen.available(), liger_supported(base),
                   torch.cuda.get_device_properties(0).total_memory / GIB)

    @classmethod
    def assumed_gpu(cls, base) -> Machine:
        """A CUDA GPU as count-params assumes it from this machine: this torch (varlen attention or not),
        liger-kernel installed (the project's GPU setup; liger's own list of architectures when it is
        installed here, else the Llama family), its memory unknown."""
        installed = importlib.util.find_spec("liger_kernel") is not None
        liger = liger_supported(base) if installed else base.config.model_type in VARLEN_FAMILIES
        return cls("cuda", varlen.kernel() is not None, liger, None)


def resolve_path(recipe, base, machine: Machine) -> params.SpeedPath:
    """The recipe's speed settings that change memory, each `auto` resolved for the model and machine."""
    t = recipe.train
    attention = recipe.model.attn_implementation
    prompt_learning = recipe.method.name in methods.PROMPT_LEARNING
    use_varlen = _varlen_possible(attention, base, machine, prompt_learning)
    packed = _resolve_packing(t.packing, base, use_varlen, prompt_learning)
    if use_varlen and (packed or attention == "varlen"):
        attention = "varlen"
    elif attention in ("auto", "varlen"):
        attention = "sdpa"  # transformers' default for the models packing and varlen leave out
    return params.SpeedPath(profile=t.profile, packing=packed, attention=attention,
                            liger_kernels=_resolve_liger(t.liger_kernels, base, machine),
                            fused_lora=_resolve_fused_lora(t.fused_lora, recipe.method),
                            offload_activations=_resolve_offload(t.offload_activations, t.profile, machine),
                            offload_embeddings=_resolve_embedding_offload(t.offload_embeddings, t.profile, base, machine))


def supports_packing(base) -> bool:
    """Models on transformers' attention interface build their masks from position_ids, so packed
    examples stay apart under sdpa, eager and flex attention as under varlen."""
    return (getattr(type(base), "_supports_attention_backend", False)
            and "position_ids" in inspect.signature(base.forward).parameters)


def _resolve_packing(setting, base, use_varlen: bool, prompt_learning: bool) -> bool:
    """auto packs only under varlen attention: sdpa and eager compute a packed row's attention
    over the whole row (masked), which costs more than the padding it saves. Prompt learning puts its
    virtual tokens in front of each row, and a packed row holds several examples."""
    if setting == "auto":
        return use_varlen and supports_packing(base) and not prompt_learning
    if setting and prompt_learning:
        raise UserError("prompt learning puts its virtual tokens in front of each row, and a packed row holds "
                        "several examples", where="train.packing", hint="set train.packing: false (or auto)")
    if setting and not supports_packing(base):
        raise UserError(f"{type(base).__name__} cannot keep packed examples apart", where="train.packing",
                        hint="set train.packing: false (or auto)")
    return setting


def _varlen_possible(setting: str, base, machine: Machine, prompt_learning: bool) -> bool:
    """Whether the run can (auto) or must (varlen) use varlen attention: not for prompt learning, whose
    rows grow by virtual tokens (prefix tuning: keys and values only) after the sequence bounds are known."""
    if setting == "varlen":
        if not machine.varlen:
            raise UserError("varlen attention needs a CUDA GPU and torch.nn.attention.varlen (torch 2.9+)",
                            where="model.attn_implementation", hint="use auto or sdpa")
        if prompt_learning:
            raise UserError("varlen attention takes each row's own tokens, and prompt learning adds virtual ones",
                            where="model.attn_implementation", hint="use auto or sdpa")
        return True
    return (setting == "auto" and machine.varlen and base.config.model_type in VARLEN_FAMILIES
            and not getattr(base.config, "attention_dropout", 0.0) and not prompt_learning)


def liger_supported(base) -> bool:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return base.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def _resolve_liger(setting, base, machine: Machine) -> bool:
    if setting == "auto":
        return machine.liger
    if setting and not machine.liger:
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


def _resolve_offload(setting, profile: str, machine: Machine) -> bool:
    """Offloading moves GPU activations to CPU memory; on a CPU there is nothing to move."""
    wanted = profile == "lean" if setting == "auto" else setting
    return wanted and machine.device == "cuda"


def _resolve_embedding_offload(setting, profile: str, base, machine: Machine) -> bool:
    if setting == "auto":
        return profile == "lean" and machine.device == "cuda" and cpu_embedding.offloadable(base) is not None
    if setting and machine.device != "cuda":
        raise UserError("the embedding table is already in CPU memory on a CPU", where="train.offload_embeddings",
                        hint="set it to auto or false")
    if setting and cpu_embedding.offloadable(base) is None:
        raise UserError("only an input embedding that does not train and is not tied to the output head can live "
                        "in CPU memory", where="train.offload_embeddings", hint="set it to auto or false")
    return setting


# ---------------------------------------------------------------------------------------
# Gradient checkpointing, by profile and memory


def fit_checkpointing(estimate, path: params.SpeedPath, t, machine: Machine, layers: int
                      ) -> tuple[params.Estimate, float | None]:
    """choose_checkpointing on `estimate(path)`; where layers are checkpointed and train.offload_activations
    is auto, again with the checkpointed layers' inputs in CPU memory, taken where fewer layers then need
    recomputing or only then the step fits. Their copies overlap with compute, and each layer not
    recomputed saves a third of its compute. 8B fast held to 24 GiB, H200: 25 layers checkpointed and
    offloaded ran at 13,143 tok/s against 27 kept on the GPU at 12,974 (one call), and at 13,309 against
    13,130 and 13,145 (another; its first run, offloaded, 12,361: a call's first run is its slowest)."""
    memory, budget = choose_checkpointing(estimate(path), t, machine, layers)
    if memory.checkpointed and not path.offload_activations and t.offload_activations == "auto":
        offloaded = choose_checkpointing(estimate(replace(path, offload_activations=True)), t, machine, layers)
        if offloaded[0].checkpointed < memory.checkpointed or over_budget(memory, budget):
            return offloaded
    return memory, budget


def choose_checkpointing(memory: params.Estimate, t, machine: Machine, layers: int
                         ) -> tuple[params.Estimate, float | None]:
    """The estimate with its checkpointed layers chosen, and the memory budget it was chosen within.

    lean: every layer. fast: none, or as few layers as keep the estimated peak within the budget
    (train.max_memory_gib, else default_budget_gib; none on a CPU, where nothing is worth recomputing)."""
    budget = None
    if machine.device == "cuda":
        budget = t.max_memory_gib or default_budget_gib(memory, machine.memory_gib)
    if t.gradient_checkpointing != "auto":
        checkpointed = layers if t.gradient_checkpointing else 0
    elif t.profile == "lean":
        checkpointed = layers
    else:
        checkpointed = fewest_checkpointed(lambda k: memory.peak(k) / GIB, layers, budget) if budget else 0
    offload = memory.path.offload_activations and checkpointed > 0
    return replace(memory, checkpointed=checkpointed, path=replace(memory.path, offload_activations=offload)), budget


def default_budget_gib(memory: params.Estimate, gpu_gib: float | None) -> float:
    """The GPU memory a run plans within when train.max_memory_gib is not set: the model's memory in 16-bit
    (sixteen_bit_model_bytes) and half as much again for activations, at least FAST_BUDGET_FLOOR_GIB (a small
    model's activations take more than the model); for a 4-bit base, its own memory's share of that, since
    it is chosen to train in less; within 90% of the GPU (`gpu_gib`, where known).

    Not the whole GPU: past these budgets memory buys little speed. In one call on an H100 the 8B workload
    ran at 12,631 tok/s in 23.3 GiB within this budget (TRL's SFTTrainer: 8,034 in 19.7) and at 15,932 in
    49.8 GiB with no layer recomputed; its QLoRA at 11,501 in 8.4 GiB (9.1 GiB budget) and 15,450 in 40.3.
    And a budget of the model's, not of the GPU's, makes a recipe plan the same steps on every GPU it fits."""
    reference = sixteen_bit_model_bytes(memory)
    budget = max(FAST_BUDGET_FLOOR_GIB * GIB, (1 + FAST_ACTIVATION_SHARE) * reference) * memory.static_bytes() / reference
    return min(budget / GIB, DEFAULT_MEMORY_FRACTION * gpu_gib) if gpu_gib else budget / GIB


def fewest_checkpointed(peak, layers: int, budget_gib: float) -> int:
    """The fewest checkpointed layers whose estimated `peak(k)` GiB is within the budget; all when none is."""
    return next((k for k in range(layers + 1) if peak(k) <= budget_gib), layers)


def checkpoint_layers(base, checkpointed: int, *, offload: bool, compiled: bool = False) -> None:
    """Checkpoint the first `checkpointed` decoder layers: the last ones are back-propagated first, so
    keeping their activations needs no recompute at the start of backward. Their recompute skips the
    down projection's base matmul where the layer adds its output to the residual stream and ends
    (fused_lora.mark_unused_in_recompute); not in compiled layers, whose recompute torch.compile traces
    with the forward and which take no other checkpoint contexts than selective checkpointing's."""
    if not checkpointed:
        return
    options = {} if compiled else {"context_fn": fused_lora.checkpoint_contexts}
    base.activation_checkpointing_enable({"use_reentrant": False, **options})
    base.disable_input_require_grads()  # non-reentrant checkpointing needs no gradient at the embeddings
    layers = decoder_layers(base)
    for layer in layers[checkpointed:]:
        layer.gradient_checkpointing = False
    if options and base.config.model_type in RESIDUAL_LAST_FAMILIES:
        for layer in layers[:checkpointed]:
            if (mlp := own_mlp(layer)) is not None:
                fused_lora.mark_unused_in_recompute(mlp.down_proj)
    if offload:  # transformers' offload=True copies on the compute stream, which then waits (activation_offload)
        activation_offload.enable(layers[:checkpointed], **options)
