"""The recipe schema: every field a user can write, its type, default and meaning.

This module is the reference. `peft init` writes its starter recipe from it and the
README's recipe reference is generated from it (`python -m peftcli.reference`).
Loading turns YAML text into a validated `Recipe`, or a `UserError` that names the file,
the line and the field, and suggests the closest valid key for a typo.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from peftcli.errors import UserError

# Strict ints and bools: a rank of "8" or `true` is a mistake, not something to coerce.
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
Flag = Annotated[bool, Field(strict=True)]


def _flag_or_auto(value: Any) -> Any:
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"expected true, false or auto (got {value!r})")


# A switch whose `auto` lets the run decide (by profile, device and model): one error for anything else.
FlagOrAuto = Annotated[Union[bool, Literal["auto"]], BeforeValidator(_flag_or_auto)]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


# Floats stay lax so that YAML's `1e-4` (a string to YAML 1.1) reads as a number; .nan and
# .inf are never a meaningful setting.
Real = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class Section(BaseModel):
    """A recipe section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _resolve_local(value: str, info: ValidationInfo) -> Path | None:
    """The path `value` names relative to the recipe's folder, if something exists there."""
    base_dir = (info.context or {}).get("base_dir", Path.cwd())
    candidate = Path(base_dir, Path(value).expanduser())
    return candidate.resolve() if candidate.exists() else None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith(DATA_SUFFIXES + (".gguf",))


class ModelSection(Section):
    base: str = Field("builtin:tiny-gpt2", description="builtin:NAME, a local HF model folder, a hub id, or a .gguf file")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on a GPU that has it, float32 on CPU")
    load_in_4bit: Flag = Field(False, description="load the base in 4-bit with bitsandbytes (QLoRA; NF4 and double quantization unless method qlora sets them); needs a CUDA GPU")
    trust_remote_code: Flag = Field(False, description="run model code shipped with a hub model (only if you trust it)")
    attn_implementation: Literal["auto", "varlen", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="attention kernel; auto = varlen (padding-free flash) on a GPU when packing a Llama-family "
                            "model, else the model's default (sdpa)")

    @field_validator("base")
    @classmethod
    def _resolve_base(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("builtin:"):
            return value
        local = _resolve_local(value, info)
        if local is not None:
            return str(local)
        if _looks_like_path(value):
            raise ValueError(f"no model file or folder at '{value}' (relative paths start at the recipe's folder)")
        return value  # a hub id


# ---------------------------------------------------------------------------------------
# Methods: one class per PEFT method, selected by `name`. Shared fields live in small base
# classes, so a field means the same thing in every method that has it.

TARGET_SHORTHANDS = ("auto", "attention", "mlp", "all-linear")
REGEX_CHARACTERS = set(".*+?[](){}|^$\\")
FOUR_BIT_METHODS = ("lora", "qlora", "dora", "rslora", "ia3", "adalora", "prefix", "prompt", "p_tuning", "adapter")
MUTATING_INITS = ("pissa", "olora")  # they rewrite the base weights, which a 4-bit base cannot take
IMPLIED_FLAGS = {"dora": "use_dora", "rslora": "use_rslora"}  # the shorthands are these lora flags

UseRslora = Annotated[bool, Field(strict=True, description="scale the update by alpha/√r instead of alpha/r (rsLoRA), so higher ranks keep learning")]
UseDora = Annotated[bool, Field(strict=True, description="DoRA: also train a magnitude per output feature; LoRA then updates only the weight's direction")]
Fraction = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, lt=1)]


class MethodSection(Section):
    name: str = Field("lora", description="the PEFT method")  # each method narrows it to its own name


class TargetedMethod(MethodSection):
    """A method that wraps modules of the model."""

    target_modules: list[str] | str = Field(
        "auto", description="modules to adapt: auto (this method's preset for the architecture), attention, mlp, "
                            "all-linear, a list of names (a name matches every module ending in it, e.g. attn.c_proj), "
                            "or a regex over full module names")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError("name at least one module, or use auto")
            return value
        if value in TARGET_SHORTHANDS:
            return value
        if not REGEX_CHARACTERS & set(value):  # a bare word is a typo of a shorthand or a one-name list
            close = difflib.get_close_matches(value, TARGET_SHORTHANDS, n=1)
            raise ValueError(f"'{value}' is not a shorthand ({', '.join(TARGET_SHORTHANDS)})"
                             + (f"; did you mean '{close[0]}'?" if close else f"; for one module write [{value}]"))
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"'{value}' is not a valid regex: {err}") from None
        return value


class LoraFields(TargetedMethod):
    r: PositiveInt = Field(8, description="rank of the low-rank update B·A")
    alpha: Real = Field(16.0, gt=0, description="scale numerator: the update is multiplied by alpha/r")
    dropout: Real = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input, in [0, 1)")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases to train")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="A and B at the start: default (A random, B zero), gaussian (A gaussian, B zero), "
                               "pissa / olora (from the base weights' SVD / QR; the saved adapter is converted to "
                               "plain LoRA on the unchanged base), loftq (against the 4-bit quantization error; qlora only)")


class LoraMethod(LoraFields):
    """LoRA: W + (alpha/r)·B·A on the target modules; B starts at zero so training starts from the base."""

    name: Literal["lora"] = Field("lora", description="the PEFT method")
    use_rslora: UseRslora = False
    use_dora: UseDora = False


class QloraMethod(LoraFields):
    """QLoRA: LoRA on a base loaded in 4-bit (bitsandbytes, bf16 compute); the same as lora with model.load_in_4bit. Needs a CUDA GPU."""

    name: Literal["qlora"] = Field("qlora", description="the PEFT method")
    use_rslora: UseRslora = False
    use_dora: UseDora = False
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat, for normally distributed weights) or fp4")
    double_quant: Flag = Field(True, description="also quantize the quantization constants (saves ~0.4 bit per weight)")


class DoraMethod(LoraFields):
    """DoRA: LoRA with use_dora: a trained magnitude per output feature, LoRA on the direction (Liu et al., 2024)."""

    name: Literal["dora"] = Field("dora", description="the PEFT method")
    use_rslora: UseRslora = False


class RsloraMethod(LoraFields):
    """rsLoRA: LoRA with use_rslora, the update scaled by alpha/√r (Kalajdzievski, 2023)."""

    name: Literal["rslora"] = Field("rslora", description="the PEFT method")
    use_dora: UseDora = False


class Ia3Method(TargetedMethod):
    """IA³: learned vectors that rescale the keys, values and feed-forward activations (Liu et al., 2022)."""

    name: Literal["ia3"] = Field("ia3", description="the PEFT method")
    feedforward_modules: list[str] | Literal["auto"] = Field(
        "auto", description="target modules whose input (not output) is rescaled; auto = the architecture's "
                            "feed-forward output layer (down_proj, mlp.c_proj)")


class PromptLearningFields(MethodSection):
    num_virtual_tokens: PositiveInt = Field(20, description="virtual tokens learned in front of every input")


class PrefixMethod(PromptLearningFields):
    """Prefix tuning: learned keys and values prepended in every attention layer (Li & Liang, 2021)."""

    name: Literal["prefix"] = Field("prefix", description="the PEFT method")
    prefix_projection: Flag = Field(False, description="learn the prefix through a 2-layer MLP (reparameterisation: more parameters while training, steadier)")
    encoder_hidden_size: PositiveInt | None = Field(None, description="hidden width of that MLP; null = the model's hidden size; needs prefix_projection")

    @model_validator(mode="after")
    def _projection_width_needs_projection(self) -> PrefixMethod:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size is the width of the prefix projection; set prefix_projection: true")
        return self


class PromptMethod(PromptLearningFields):
    """Prompt tuning: learned embeddings of virtual tokens prepended to the input (Lester et al., 2021)."""

    name: Literal["prompt"] = Field("prompt", description="the PEFT method")
    init: Literal["random", "text"] = Field("random", description="start the virtual tokens random, or as the embeddings of init_text")
    init_text: str | None = Field(None, description="text whose token embeddings start the virtual tokens (init: text)")

    @model_validator(mode="after")
    def _text_goes_with_text_init(self) -> PromptMethod:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text, e.g. init_text: 'Answer the question:'")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("init_text is only used with init: text")
        return self


class PTuningMethod(PromptLearningFields):
    """P-tuning: virtual-token embeddings produced by a small trained encoder (Liu et al., 2021)."""

    name: Literal["p_tuning"] = Field("p_tuning", description="the PEFT method")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="the prompt encoder that produces the virtual tokens")
    encoder_hidden_size: PositiveInt | None = Field(None, description="hidden width of the encoder; null = the model's hidden size")
    encoder_dropout: Real = Field(0.0, ge=0, lt=1, description="dropout inside the encoder")


class LycorisFields(TargetedMethod):
    r: PositiveInt = Field(8, description="rank of each factor")
    alpha: Real = Field(8.0, gt=0, description="scale numerator: the update is multiplied by alpha/r")
    rank_dropout: Real = Field(0.0, ge=0, lt=1, description="dropout over the update's rank dimension while training")
    module_dropout: Real = Field(0.0, ge=0, lt=1, description="probability of skipping a module's update in a training step")


class LohaMethod(LycorisFields):
    """LoHa: ΔW = (B₁A₁) ⊙ (B₂A₂), a Hadamard product of two low-rank products (Hyeon-Woo et al., 2022). nn.Linear layers only."""

    name: Literal["loha"] = Field("loha", description="the PEFT method")


class LokrMethod(LycorisFields):
    """LoKr: ΔW = C ⊗ (BA), a Kronecker product with a low-rank factor (Yeh et al., 2024). nn.Linear layers only."""

    name: Literal["lokr"] = Field("lokr", description="the PEFT method")
    decompose_both: Flag = Field(False, description="also decompose the small Kronecker factor C into a low-rank product")
    decompose_factor: Annotated[int, Field(strict=True, ge=-1)] = Field(
        -1, description="size of the small Kronecker factor; -1 = as close to the square root of the dimension as divides it")


class AdaloraMethod(TargetedMethod):
    """AdaLoRA: LoRA in SVD form whose rank budget moves to the layers that matter during training (Zhang et al., 2023)."""

    name: Literal["adalora"] = Field("adalora", description="the PEFT method")
    init_r: PositiveInt = Field(12, description="rank every layer starts with")
    r: PositiveInt = Field(8, description="average rank per layer once the budget has been pruned")
    alpha: Real = Field(16.0, gt=0, description="scale numerator, as in LoRA")
    dropout: Real = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input, in [0, 1)")
    warmup_fraction: Fraction = Field(0.1, description="fraction of the steps trained at init_r before pruning starts")
    final_fraction: Fraction = Field(0.2, description="fraction of the steps at the end trained with the ranks frozen")
    prune_every: PositiveInt = Field(1, description="steps between two re-allocations of the rank budget")
    orth_reg_weight: Real = Field(0.5, ge=0, description="weight of the loss that keeps P and Q orthogonal")

    @model_validator(mode="after")
    def _schedule(self) -> AdaloraMethod:
        if self.r > self.init_r:
            raise ValueError(f"r ({self.r}) is the budget pruned down from init_r ({self.init_r}); it cannot be larger")
        if self.warmup_fraction + self.final_fraction >= 1:
            raise ValueError("warmup_fraction + final_fraction must leave steps for pruning (sum below 1)")
        return self


class VeraMethod(TargetedMethod):
    """VeRA: one pair of frozen random matrices shared by all layers; each layer trains two scaling vectors (Kopiczko et al., 2024)."""

    name: Literal["vera"] = Field("vera", description="the PEFT method")
    r: PositiveInt = Field(256, description="rank of the shared random matrices (cheap: only the scaling vectors train)")
    d_initial: Real = Field(0.1, gt=0, description="initial value of the scaling vector d")
    dropout: Real = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input, in [0, 1)")
    projection_seed: Annotated[int, Field(strict=True)] = Field(0, description="seed of the shared random matrices (saved with the adapter)")


class AdapterMethod(TargetedMethod):
    """Bottleneck adapters: x + s·up(f(down(x))) (Houlsby et al., 2019; parallel: He et al., 2022); up starts at zero. Not mergeable."""

    name: Literal["adapter"] = Field("adapter", description="the PEFT method")
    variant: Literal["houlsby", "parallel"] = Field(
        "houlsby", description="houlsby: in sequence after the attention and after the feed-forward block; "
                               "parallel: beside the feed-forward block, its output added scaled")
    bottleneck_size: PositiveInt | None = Field(None, description="width of the bottleneck; null = the model's hidden size / reduction_factor")
    reduction_factor: PositiveInt | None = Field(None, description="hidden size / bottleneck width; null = 16 (when bottleneck_size is null)")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="activation between the down- and up-projection")
    scaling: Real = Field(1.0, gt=0, description="multiplier s of the adapter's output")

    @model_validator(mode="after")
    def _one_width(self) -> AdapterMethod:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError("set either bottleneck_size or reduction_factor, not both")
        return self


class FullMethod(MethodSection):
    """Full fine-tuning: the model's own parameters train (all, or those of trainable_modules), no adapter; the baseline to compare the PEFT methods with. The run saves the whole model."""

    name: Literal["full"] = Field("full", description="the PEFT method")
    trainable_modules: list[Annotated[str, Field(min_length=1)]] | Literal["all"] = Field(
        "all", description="whose parameters train: all, or a list of module names (a name matches every module "
                           "ending in it, e.g. mlp, h.0, lm_head); the others stay frozen")

    @field_validator("trainable_modules")
    @classmethod
    def _some(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or use all")
        return value


SingleMethod = Annotated[Union[LoraMethod, QloraMethod, DoraMethod, RsloraMethod, Ia3Method, PrefixMethod,
                               PromptMethod, PTuningMethod, LohaMethod, LokrMethod, AdaloraMethod, VeraMethod,
                               AdapterMethod, FullMethod],
                         Field(discriminator="name")]
MIXABLE = ("lora", "dora", "rslora", "loha", "lokr")  # what peftcli trains together in peft's mixed model


def unmixable_reason(name: str) -> str | None:
    """Why a method cannot be one of several on one model (peft's mixed model), or None."""
    if name in MIXABLE:
        return None
    if name in ("prefix", "prompt", "p_tuning"):
        return ("prompt-learning methods add virtual tokens (or per-layer prefixes) to the input instead of adapting "
                "layers, and peft's mixed model combines layer adapters only")
    if name == "full":
        return "full fine-tuning trains the model itself, not an adapter beside others"
    if name == "qlora":
        return "a list of methods trains on a 16/32-bit base; use lora"
    if name == "adalora":
        return ("AdaLoRA moves its rank budget during training through its own peft model, which peft's mixed "
                "model does not run")
    return f"peft's mixed model takes LoRA, LoHa, LoKr, AdaLoRA, OFT and SHiRA adapters, not {name}"


class MixedMethod(MethodSection):
    """Several methods on one model at once through peft's mixed model, e.g. LoRA on the attention and LoHa on the MLP; write method as a list of method sections. Each trains and saves as its own adapter."""

    name: Literal["mixed"] = Field("mixed", description="the PEFT method")
    components: list[SingleMethod] = Field(
        default_factory=lambda: [LoraMethod(target_modules="attention"), LohaMethod(target_modules="mlp")],
        description=f"the methods, each a method section: two or more of {', '.join(MIXABLE)} (their targets may overlap)")

    @field_validator("components")
    @classmethod
    def _mixable(cls, components: list) -> list:
        if len(components) < 2:
            raise ValueError("a list of methods mixes two or more; write a single method as a section "
                             "(method: {name: ...})")
        for index, component in enumerate(components):
            if (reason := unmixable_reason(component.name)) is not None:
                raise ValueError(f"method {index} ({component.name}) cannot be mixed with others: {reason}")
            if getattr(component, "init", "default") not in ("default", "gaussian"):
                raise ValueError(f"method {index} ({component.name}): init {component.init} starts from the base "
                                 "weights and is saved converted, which peftcli does for a single LoRA only")
        return components


Method = Annotated[Union[LoraMethod, QloraMethod, DoraMethod, RsloraMethod, Ia3Method, PrefixMethod, PromptMethod,
                         PTuningMethod, LohaMethod, LokrMethod, AdaloraMethod, VeraMethod, AdapterMethod, FullMethod,
                         MixedMethod],
                   Field(discriminator="name")]


class DataSection(Section):
    train: str = Field("builtin:contacts", description="training data: a jsonl/json/csv/parquet/txt file, builtin:NAME, or a hub dataset")
    eval: str | None = Field(None, description="evaluation data, same forms as train; or use eval_fraction")
    eval_fraction: Real | None = Field(None, gt=0, lt=1, description="hold out this fraction of train for evaluation")
    format: Literal["auto", "alpaca", "chat", "completion", "text"] = Field(
        "auto", description="row layout; auto picks it from the columns")
    max_length: PositiveInt = Field(512, description="tokens per example; what happens to longer ones is on_long")
    train_on_prompt: Flag = Field(False, description="also compute the loss on prompt tokens (alpaca, chat, completion)")
    on_long: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="examples longer than max_length: truncate or drop them (counted in the report), or stop")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="a bad row (invalid JSON line, missing or mistyped field, no tokens): stop, or skip it and list it in the report")

    @field_validator("train", "eval")
    @classmethod
    def _resolve_data(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value.startswith("builtin:"):
            return value
        local = _resolve_local(value, info)
        if local is not None:
            return str(local)
        if _looks_like_path(value):
            raise ValueError(f"no data file at '{value}' (relative paths start at the recipe's folder)")
        return value  # a hub dataset name

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSection:
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("set either eval (a file) or eval_fraction, not both")
        return self


class TrainSection(Section):
    epochs: Real | None = Field(None, gt=0, description="passes over the data (1 when neither epochs nor max_steps is set)")
    max_steps: PositiveInt | None = Field(None, description="optimizer steps to run; use instead of epochs")
    batch_size: PositiveInt = Field(8, description="examples per device per step")
    grad_accum: PositiveInt = Field(1, description="gradient accumulation steps (effective batch = batch_size × grad_accum)")
    lr: Real = Field(2.0e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warm-up")
    warmup_ratio: Real = Field(0.03, ge=0, lt=1, description="fraction of steps spent warming up the learning rate")
    weight_decay: Real = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: Real = Field(1.0, gt=0, description="gradient clipping norm")
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit",
                   "paged_adamw_32bit", "adafactor", "sgd"] = Field(
        "auto", description="optimizer; auto = fused AdamW on a GPU (bitsandbytes' 8-bit AdamW under the lean "
                            "profile), AdamW on CPU")
    seed: Annotated[int, Field(strict=True)] = Field(42, description="seed for initialisation, data order and dropout")
    logging_steps: PositiveInt = Field(5, description="log the training loss every N steps")
    eval_steps: PositiveInt | None = Field(None, description="evaluate every N steps (always at the end when there is eval data)")
    save_steps: PositiveInt | None = Field(None, description="write a resumable checkpoint every N steps")
    save_total_limit: PositiveInt | None = Field(2, description="keep only the newest N checkpoints")
    gradient_checkpointing: FlagOrAuto = Field(
        "auto", description="recompute activations in backward to save memory; auto = by profile: fast checkpoints "
                            "only the layers that do not fit in max_memory_gib, lean all of them")
    profile: Literal["fast", "lean"] = Field(
        "fast", description="speed/memory defaults: fast = fastest that fits in memory; lean = least memory "
                            "(every layer checkpointed, activations offloaded to CPU on a GPU)")
    packing: FlagOrAuto = Field(
        "auto", description="padding-free packing of examples into token-budget batches (no attention across "
                            "examples); auto = when varlen attention runs (sdpa/eager attend over a whole packed row)")
    max_tokens_per_batch: PositiveInt | None = Field(
        None, description="token budget of a packed batch; null = batch_size × the mean example length, so a step "
                          "holds about batch_size examples")
    micro_batches: Annotated[Union[Literal["auto"], PositiveInt], BeforeValidator(_not_bool)] = Field(
        "auto", description="split each packed batch into this many micro-batches whose gradients accumulate: the "
                            "same tokens per optimizer step, a fraction of the activations; auto = as few as fit in max_memory_gib; "
                            "lean also splits until the activations take at most a quarter of the model's memory in 16-bit")
    max_memory_gib: Real | None = Field(
        None, gt=0, description="GPU memory a run plans within, giving up speed cheapest first: checkpointed layers (their "
                                "inputs offloaded where that spares recomputing some), smaller micro-batches; null = the model's budget: "
                                "24 GiB, or 1.5× the model's 16-bit memory if more, a 4-bit base's share of it, within 90% of the GPU")
    offload_activations: FlagOrAuto = Field(
        "auto", description="keep checkpointed activations in CPU memory (GPU only); auto = on for the lean profile, and for "
                            "fast when that lets fewer layers be recomputed within max_memory_gib, or nothing else fits")
    offload_embeddings: FlagOrAuto = Field(
        "auto", description="keep the input embedding table in CPU memory and look tokens up there (GPU only; an "
                            "untied table that does not train); auto = on for the lean profile")
    liger_kernels: FlagOrAuto = Field(
        "auto", description="liger-kernel's fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy (no full logits); "
                            "auto = on a GPU with liger-kernel installed, for the architectures it supports")
    fused_lora: FlagOrAuto = Field(
        "auto", description="compute each LoRA layer (base matmul and low-rank path) in one autograd function; "
                            "auto = for LoRA with dropout 0")
    compile: Flag = Field(False, description="torch.compile each decoder layer (minutes of compiling first; not yet measured on a GPU)")
    on_nan: Literal["stop", "skip_step"] = Field(
        "stop", description="a NaN/Inf loss or gradient: stop the run (exit 1, checkpoints kept), or skip that step's update")

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set either epochs or max_steps, not both")
        return self


class DistributedSection(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = Field(
        "ddp", description="how several processes share the work (peft train --gpus N, torchrun, accelerate launch)")
    cpu_offload: Flag = Field(False, description="fsdp / deepspeed_zero3: keep parameters and optimizer state in CPU memory")


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name; letters, digits, . _ -")
    model: ModelSection = Field(default_factory=ModelSection, description="the base model")
    method: Method = Field(default_factory=LoraMethod, description="the PEFT method and its settings")
    data: DataSection = Field(default_factory=DataSection, description="training and evaluation data")
    train: TrainSection = Field(default_factory=TrainSection, description="optimisation settings")
    distributed: DistributedSection = Field(default_factory=DistributedSection,
                                            description="several GPUs or processes (one process ignores it)")
    output_dir: str = Field("runs/${name}", validate_default=True, description="run directory, relative to where peft runs; ${name} is the run name")

    @field_validator("method", mode="before")
    @classmethod
    def _default_method_name(cls, value: Any) -> Any:
        """A section without a name is LoRA; a list of sections is the mixed method's components."""
        if isinstance(value, list):
            value = {"name": "mixed", "components": value}
        if not isinstance(value, dict):
            return value
        value = {"name": "lora", **value}
        if value["name"] == "mixed" and isinstance(value.get("components"), list):
            value["components"] = [{"name": "lora", **c} if isinstance(c, dict) else c for c in value["components"]]
        return value

    @field_validator("method")
    @classmethod
    def _fits_the_model(cls, method: MethodSection, info: ValidationInfo) -> MethodSection:
        """Settings of the method that contradict the model section."""
        model = info.data.get("model")
        if model is None:  # the model section is invalid and reported on its own
            return method
        if method.name == "mixed":
            if model.load_in_4bit:
                raise ValueError("a list of methods (peft's mixed model) trains on a 16/32-bit base in peftcli, and "
                                 "LoHa and LoKr have no 4-bit layers; set model.load_in_4bit: false")
            return method
        if method.name == "qlora" and "load_in_4bit" in model.model_fields_set and not model.load_in_4bit:
            raise ValueError("qlora loads the base in 4-bit; drop model.load_in_4bit: false, or use method lora")
        four_bit = model.load_in_4bit or method.name == "qlora"
        if four_bit and method.name == "full":
            raise ValueError("full fine-tuning trains the weights themselves, and 4-bit weights cannot be trained; "
                             "set model.load_in_4bit: false, or train an adapter on the 4-bit base (e.g. qlora)")
        if four_bit and method.name not in FOUR_BIT_METHODS:
            raise ValueError(f"{method.name} cannot train on a 4-bit base (peft has no 4-bit {method.name} layer); "
                             f"set model.load_in_4bit: false, or use one of: {', '.join(FOUR_BIT_METHODS)}")
        init = getattr(method, "init", None)
        if init == "loftq" and not four_bit:
            raise ValueError("init: loftq fits the adapter to the 4-bit quantization error; use method qlora "
                             "(or model.load_in_4bit: true), or another init")
        if init in MUTATING_INITS and four_bit:
            raise ValueError(f"init: {init} rewrites the base weights, which a 4-bit base cannot take; "
                             "use init: default or loftq with qlora")
        return method

    @model_validator(mode="after")
    def _qlora_loads_in_4bit(self) -> Recipe:
        """qlora and model.load_in_4bit say the same thing; the resolved recipe says it in both places."""
        if self.method.name == "qlora" and not self.model.load_in_4bit:
            self.model.load_in_4bit = True
        return self

    @field_validator("output_dir")
    @classmethod
    def _interpolate(cls, value: str, info: ValidationInfo) -> str:
        """Replace ${name} (or ${section.key}) with the recipe's value."""

        def lookup(match: re.Match) -> str:
            head, *rest = match.group(1).split(".")
            found: Any = info.data.get(head)
            for part in rest:
                found = getattr(found, part, None)
            if found is None or isinstance(found, BaseModel):
                raise ValueError(f"${{{match.group(1)}}} names no recipe value")
            return str(found)

        return re.sub(r"\$\{([\w.]+)\}", lookup, value)

    def to_yaml(self) -> str:
        resolved = self.model_dump(mode="json")
        if self.method.name == "mixed":  # as the user writes it: a list of method sections
            resolved["method"] = resolved["method"]["components"]
        return yaml.safe_dump(resolved, sort_keys=False)


# ---------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (`--set a.b=value`) and validate a recipe file."""
    path = Path(path)
    text = _read_text(path, what="recipe")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"invalid YAML: {_yaml_problem(err)}", where=_yaml_where(path, err)) from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"a recipe is a mapping of sections (model:, method:, data:, train:), not a {type(raw).__name__}",
                        where=str(path))
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, base_dir=path.resolve().parent, source=str(path), text=text, overrides=overrides)


def recipe_from_overrides(overrides: list[str] | tuple[str, ...], *, base_dir: Path) -> Recipe:
    """A recipe written on the command line: the defaults with `KEY=VALUE` overrides, validated like a file."""
    raw: dict = {}
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, base_dir=base_dir, source="command line", overrides=overrides)


def validate_recipe(raw: dict, *, base_dir: Path, source: str = "recipe", text: str | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as err:
        listed = isinstance(raw.get("method"), list)
        problems = [_describe(e, source, text, overrides, listed) for e in err.errors()]
        raise UserError("invalid recipe\n  " + "\n  ".join(problems)) from err
    problems = [f"{_where(loc, source, text, overrides)}: {'.'.join(loc)}: {why}" for loc, why in contradictions(recipe)]
    if problems:
        raise UserError("invalid recipe\n  " + "\n  ".join(problems))
    return recipe


def contradictions(recipe: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """Settings valid one by one that cannot hold together, as (field path, why); sections check their own."""
    found = []
    if recipe.train.eval_steps is not None and recipe.data.eval is None and recipe.data.eval_fraction is None:
        found.append((("train", "eval_steps"), "evaluating every N steps needs evaluation data; "
                                               "set data.eval or data.eval_fraction, or remove train.eval_steps"))
    return found


def apply_override(raw: dict, override: str) -> None:
    """Set `KEY=VALUE` (dotted KEY) in the raw recipe; VALUE is read as YAML (`[a, b]`, `1e-4`, `true`)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set takes KEY=VALUE with a dotted key, e.g. train.lr=1e-4 (got '{override}')")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # a list of sections (several methods): the part is a position
            if not (part.isdigit() and int(part) < len(node)):
                raise UserError(f"'{'.'.join(parts[:i])}' is a list of {len(node)}; name a position from 0 to "
                                f"{len(node) - 1}", where=f"--set {override}")
            child = node[int(part)]
        else:
            child = node.setdefault(part, {})
        sections = isinstance(child, list) and i + 2 < len(parts)  # a position follows, then a key
        if not isinstance(child, dict) and not sections:
            raise UserError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section", where=f"--set {override}")
        node = child
    node[parts[-1]] = parsed
    rival = {"epochs": "max_steps", "max_steps": "epochs"}.get(parts[-1])
    if parts[:-1] == ["train"] and rival and parsed is not None:
        node.pop(rival, None)  # --set train.max_steps=N replaces the file's epochs (and the reverse)


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise UserError(f"{what} file not found", where=str(path))
    if path.is_dir():
        raise UserError(f"expected a {what} file, found a folder", where=str(path))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text (byte {err.start})", where=str(path)) from err
    except OSError as err:
        raise UserError(f"cannot read {what}: {err.strerror}", where=str(path)) from err


def _yaml_where(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)


def _yaml_problem(err: yaml.YAMLError) -> str:
    return " ".join(filter(None, [getattr(err, "context", None), getattr(err, "problem", None)])) or str(err)


# ---------------------------------------------------------------------------------------
# Turning pydantic's errors into messages that name the field and the fix


def _describe(error: dict, source: str, text: str | None, overrides, listed: bool = False) -> str:
    loc, parent = _walk(error["loc"])
    if listed and loc[:2] == ("method", "components"):  # the user wrote the components as method's list
        loc = ("method", *loc[2:])
    if error["type"] == "union_tag_invalid":  # the mistake is in the method's name, not the section
        loc = (*loc, "name")
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    kind, message, got = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden" and (owners := _other_owners(loc, parent)):
        method = parent.model_fields["name"].default
        if IMPLIED_FLAGS.get(method) == loc[-1]:
            message = f"method {method} always sets {loc[-1]}; drop the key"
        else:
            name_key = ".".join(str(p) for p in (*loc[:-1], "name"))
            message = (f"'{loc[-1]}' belongs to method{'s' if len(owners) > 1 else ''} {', '.join(owners)}, "
                       f"not to {method}; set {name_key}: {owners[0]} to use it")
    elif kind == "extra_forbidden":
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        message = f"unknown key '{loc[-1]}'" + (f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}")
    elif kind == "union_tag_invalid":
        in_list = len(loc) > 2 and loc[0] == "method"  # one of several methods: only the mixable ones fit
        message = (f"unknown method '{error['ctx']['tag']}'; choose one of: "
                   f"{', '.join(MIXABLE if in_list else method_names())}")
    elif kind in ("model_type", "model_attributes_type"):
        message = f"expected a section (a mapping of keys), got {_show(got)}"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    else:
        message = f"{message[0].lower()}{message[1:]} (got {_show(got)})"
    return f"{_where(loc, source, text, overrides)}: {dotted}: {message}"


def _other_owners(loc: tuple, parent: type[BaseModel] | None) -> list[str]:
    """The methods that have the key a method section does not: a key written under the wrong method."""
    if loc[0] != "method" or parent is None or parent not in method_classes().values():
        return []
    return [name for name, cls in method_classes().items() if loc[-1] in cls.model_fields and cls is not parent]


def _walk(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """The field path as the user wrote it, and the section holding its last key.

    pydantic puts the method's name inside the path (method.lora.r); the user wrote method.r."""
    path, model, parent, union, items = [], Recipe, None, None, None
    for part in loc:
        if union is not None:  # this part is the discriminator's value
            model, union = union.get(part), None
            continue
        if items is not None and isinstance(part, int):  # an item of a list of method sections
            path.append(part)
            union, items = items, None
            continue
        path.append(part)
        parent = model
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        annotation = field.annotation if field else None
        union = union_members(annotation) if field is not None and field.discriminator else None
        items = _listed_union(annotation)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return tuple(path), parent


def _listed_union(annotation) -> dict[str, type[BaseModel]] | None:
    """For a list of discriminated sections (the mixed method's components), its members by name."""
    if get_origin(annotation) is not list:
        return None
    item = get_args(annotation)[0]
    if get_origin(item) is Annotated and any(getattr(m, "discriminator", None) for m in get_args(item)[1:]):
        return union_members(get_args(item)[0])
    return None


def union_members(annotation) -> dict[str, type[BaseModel]]:
    """The members of a discriminated union (one member is no Union to typing) by their `name`."""
    members = get_args(annotation) if get_origin(annotation) is Union else (annotation,)
    return {m.model_fields["name"].default: m for m in members}


def method_classes() -> dict[str, type[BaseModel]]:
    return union_members(Recipe.model_fields["method"].annotation)


def method_names() -> list[str]:
    return list(method_classes())


def _where(loc: tuple, source: str, text: str | None, overrides) -> str:
    dotted = ".".join(str(p) for p in loc)
    for override in overrides:
        if override.partition("=")[0].strip() == dotted:
            return f"--set {override}"
    line = _line_of(text, loc) if text else None
    return f"{source}:{line}" if line else source


def _line_of(text: str, loc: tuple) -> int | None:
    """The 1-based line where the deepest existing key of `loc` is written."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
