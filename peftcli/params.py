"""What a recipe trains and what it needs, known before a single weight is loaded.

The model is built on PyTorch's meta device from its config (`models.build_empty`: shapes,
no memory) and the recipe's adapter is attached by peft itself (`methods.attach`), so the
parameter counts are peft's own `get_nb_trainable_parameters()`, equal by construction.

A 4-bit base is counted as peft counts it: bitsandbytes packs two 4-bit weights per stored
byte and peft multiplies each packed `Params4bit` by 2 × its storage size, which gives back
the unquantized count (rounded up to a whole storage element). The layers counted that way
are the ones transformers would quantize (every linear layer but the output head).

The memory estimate models one step of `peft train` on a CUDA GPU: the HF Trainer under
bf16 autocast, sdpa (flash) attention, every row at full length (no padding), AdamW states
created, and counts what `torch.cuda.max_memory_allocated()` sees. Its parts:
- weights: bf16 (2 bytes/param), or NF4 with double quantization: 4 bits per weight, one
  8-bit absmax per block of 64 weights and one fp32 absmax per 256 blocks; the layers
  transformers does not quantize stay in fp32, as peft's prepare_model_for_kbit_training
  leaves them (QLoRA);
- trainable parameters, their gradients and the optimizer's states, in the parameters'
  dtype (peft keeps adapters in fp32) or as the 8-bit / paged optimizers keep them;
- activations saved for backward, per decoder layer, from the shapes of the layer's
  tensors (layer_bytes below), with or without gradient checkpointing;
- logits and loss: transformers upcasts the logits to fp32 for the loss; at the start of
  backward the fp32 log-softmax, its gradient and the gradient of the loss are alive at
  once, 12 bytes per vocabulary entry per token (1.4 GiB per 1,000 tokens at 128k vocab);
- framework overhead: inputs, cuBLAS workspaces and small buffers. The CUDA context (~0.5 GiB)
  is outside torch's allocator: max_memory_allocated does not count it, nor does the estimate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

from peftcli import methods, models
from peftcli.recipe import Recipe

GIB = 2**30
NF4_BLOCK = 64  # weights per absmax in bitsandbytes' 4-bit quantization
NF4_BLOCKS_PER_ABSMAX2 = 256  # double quantization: absmaxes per second-level fp32 scale
BNB_8BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizers: elements per fp32 absmax
BNB_8BIT_MIN_SIZE = 4096  # smaller tensors keep fp32 states in the 8-bit optimizers
LOSS_BYTES_PER_LOGIT = 12  # fp32 log-softmax + its gradient + the loss gradient, alive together
FRAMEWORK_OVERHEAD = 64 * 2**20  # inputs, cuBLAS workspaces, small buffers: 0-50 MiB measured on an H100
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
PAGED = ("paged_adamw_8bit", "paged_adamw_32bit")  # states in CUDA managed memory, off torch's books


# ---------------------------------------------------------------------------------------
# The skeleton: the model with its adapter on the meta device


def is_4bit(recipe: Recipe) -> bool:
    """Whether the recipe loads its base in 4-bit (the qlora method implies it)."""
    return recipe.model.load_in_4bit or recipe.method.name == "qlora"


def training_dtype(recipe: Recipe):
    """The dtype `peft train` uses on a GPU: auto is bfloat16."""
    import torch

    return torch.bfloat16 if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)


@dataclass
class Skeleton:
    """The recipe's model and adapter on the meta device, and which weights 4-bit would pack."""

    config: object
    model: object  # a peft.PeftModel whose tensors are all on the meta device
    quantizable: set  # ids of the weights transformers would quantize to 4-bit


def build_skeleton(recipe: Recipe) -> Skeleton:
    import torch

    m = recipe.model
    config = models.load_config(m.base, m.trust_remote_code)
    base = models.build_empty(config, dtype=training_dtype(recipe))
    quantizable = {id(module.weight) for module in quantizable_layers(base)}
    with torch.device("meta"):  # peft creates the adapter where the default device says: here, nowhere
        model = methods.attach(base, recipe.method)
    return Skeleton(config, model, quantizable)


def quantizable_layers(model) -> list:
    """The layers transformers replaces by bitsandbytes' Linear4bit, chosen by its own rules."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return [module for name, module in model.named_modules()
            if (isinstance(module, Conv1D) or type(module) is torch.nn.Linear) and should_convert_module(name, skip)]


def peft_4bit_numel(numel: int) -> int:
    """What peft reports for a weight bitsandbytes packs two to a byte (uint8 storage): 2 per byte."""
    return 2 * math.ceil(numel / 2)


# ---------------------------------------------------------------------------------------
# Counting


@dataclass
class ModuleGroup:
    """Modules of one kind (one name in every layer): how many, and their parameters each."""

    name: str  # the module's path with layer numbers as *, e.g. model.layers.*.self_attn.q_proj
    modules: int = 0
    base_params_each: int | None = None  # None when the modules differ in size
    adapter_params_each: int | None = None
    base_params: int = 0
    adapter_params: int = 0
    trainable_params: int = 0

    @property
    def params(self) -> int:
        return self.base_params + self.adapter_params


@dataclass
class Counts:
    total: int
    trainable: int
    four_bit: bool
    groups: list[ModuleGroup]
    adapter_file: dict  # dtype, tensors, bytes of adapter_model.safetensors

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0


def count(skeleton: Skeleton, four_bit: bool) -> Counts:
    """peft's counts of the skeleton; with `four_bit`, as peft counts a 4-bit base."""
    trainable, total = methods.trainable_parameters(skeleton.model)
    if four_bit:  # the meta model holds the weights unpacked; peft would count them packed
        total += sum(peft_4bit_numel(p.numel()) - p.numel()
                     for p in skeleton.model.parameters() if id(p) in skeleton.quantizable)
    return Counts(total, trainable, four_bit, module_groups(skeleton, four_bit), adapter_file(skeleton.model))


def module_groups(skeleton: Skeleton, four_bit: bool) -> list[ModuleGroup]:
    """Parameters grouped by module kind; a wrapped layer's own weights are `base`, peft's `adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = skeleton.model
    wrapped = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    plain = not methods.has_adapter(model)  # method full: every parameter is the model's own
    per_module: dict[str, dict[str, list[int]]] = {}  # group → module path → [base, adapter]
    groups: dict[str, ModuleGroup] = {}
    for name, param in model.named_parameters():
        owner, is_base = _owner(name, wrapped)
        is_base = is_base or plain
        numel = param.numel()
        if four_bit and id(param) in skeleton.quantizable:
            numel = peft_4bit_numel(numel)
        key = _kind(owner)
        group = groups.setdefault(key, ModuleGroup(key))
        sizes = per_module.setdefault(key, {}).setdefault(owner, [0, 0])
        sizes[0 if is_base else 1] += numel
        if is_base:
            group.base_params += numel
        else:
            group.adapter_params += numel
        if param.requires_grad:
            group.trainable_params += numel
    for key, group in groups.items():
        sizes = list(per_module[key].values())
        group.modules = len(sizes)
        group.base_params_each = _same(s[0] for s in sizes)
        group.adapter_params_each = _same(s[1] for s in sizes)
    return list(groups.values())


def _owner(param_name: str, wrapped: set[str]) -> tuple[str, bool]:
    """The module a parameter belongs to for the table, and whether it is the base model's own."""
    parts = param_name.split(".")
    for end in range(len(parts) - 1, 0, -1):  # the innermost wrapped layer holding the parameter
        layer = ".".join(parts[:end])
        if layer in wrapped:
            return layer, parts[end] == "base_layer"
    owner = param_name.rsplit(".", 1)[0]
    return owner, owner.startswith("base_model.")


def _kind(module_path: str) -> str:
    """A module's path without peft's wrapper and with layer numbers as *."""
    path = module_path.removeprefix("base_model.model.")
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path)


def _same(values) -> int | None:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def adapter_file(model) -> dict:
    """adapter_model.safetensors as peft writes it: the adapter's tensors, their dtype and the file size
    (with method full, model.safetensors as transformers writes it: the whole model)."""
    if methods.mixed.is_mixed(model):  # one file per method (peftcli.methods.mixed)
        from peft.utils import get_peft_model_state_dict

        files = [get_peft_model_state_dict(model, adapter_name=name) for name in model.peft_config]
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for f in files for t in f.values()})
        return {"dtype": ", ".join(dtypes), "tensors": sum(len(f) for f in files),
                "bytes": sum(safetensors_size(f) for f in files)}
    tensors = saved_tensors(model) if methods.has_adapter(model) else model_tensors(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {"dtype": ", ".join(dtypes), "tensors": len(tensors), "bytes": safetensors_size(tensors)}


def saved_tensors(model) -> dict:
    """The tensors peft's save_pretrained writes, as meta tensors: names, shapes and dtypes."""
    from peft.utils import get_peft_model_state_dict

    config = model.active_peft_config
    if not config.is_prompt_learning:
        return get_peft_model_state_dict(model)
    # A prompt-learning adapter is saved as its prompt encoder's output for the virtual tokens,
    # which peft copies to the CPU (get_prompt_embedding_to_save); a meta tensor has no copy.
    from peft import PeftType

    adapter = model.active_adapter
    tokens = model.prompt_tokens[adapter].unsqueeze(0)
    if config.peft_type == PeftType.PREFIX_TUNING:
        tokens = tokens[:, :config.num_virtual_tokens]
    return {"prompt_embeddings": model.prompt_encoder[adapter](tokens)[0]}


def model_tensors(model) -> dict:
    """The tensors transformers' save_pretrained writes for a whole model: its parameters and
    persistent buffers, a tied weight once."""
    tensors = dict(model.named_parameters())  # shared parameters come once, under their first name
    non_persistent = {f"{name}.{buffer}" if name else buffer for name, module in model.named_modules()
                      for buffer in getattr(module, "_non_persistent_buffers_set", ())}
    tensors.update((name, b) for name, b in model.named_buffers() if name not in non_persistent)
    return tensors


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_size(tensors: dict) -> int:
    """Size of the safetensors file holding `tensors`: 8 bytes of header length, the JSON header
    padded to 8 bytes, then the data, laid out largest dtype first, then by name (as safetensors does)."""
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in order:
        size = tensor.numel() * tensor.element_size()
        dtype = SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."), "F32")
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text % 8) + offset


# ---------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Shape:
    """What the activation model needs from a config."""

    family: str  # "llama" (RMSNorm, gated MLP, rotary: Llama, Mistral, Qwen2, ...) or "gpt2"
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gelu_new: bool = False  # GPT-2's tanh GELU written as separate operations (each saves a tensor)
    residual_dropout: bool = False  # GPT-2's dropout after attention and MLP (a 1-byte mask each)


def shape_of(config) -> Shape | None:
    """The config's shape, or None for an architecture the activation model does not know."""
    if config.model_type == "gpt2":
        h = config.n_embd
        return Shape("gpt2", config.n_layer, h, config.n_inner or 4 * h, config.n_head, config.n_head,
                     h // config.n_head, config.vocab_size, gelu_new=config.activation_function == "gelu_new",
                     residual_dropout=config.resid_pdrop > 0)
    needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    if not all(isinstance(getattr(config, key, None), int) for key in needed):
        return None
    h, heads = config.hidden_size, config.num_attention_heads
    return Shape("llama", config.num_hidden_layers, h, config.intermediate_size, heads,
                 getattr(config, "num_key_value_heads", None) or heads,
                 getattr(config, "head_dim", None) or h // heads, config.vocab_size)


# Bytes saved for backward per token and decoder layer, by setup. Measured against the tensors
# autograd holds on a GPU (tests/test_gpu_memory.py); the terms, for a Llama layer:
#   norms:   RMSNorm computes in fp32 and keeps its fp32 input: 4h each (+ the bf16 normalized
#            input for the weight's gradient when the norm trains);
#   attention: sdpa keeps q, k, v and its output in bf16 and the fp32 log-sum-exp per head;
#   MLP:     act(gate) · up keeps gate, act(gate) and up (fp32 when a 4-bit layer returns its
#            fp32 input's dtype, as after prepare_model_for_kbit_training);
#   frozen linear layers keep nothing (a frozen weight needs no input for its gradient);
#   trained linear layers keep their inputs (full fine-tuning);
#   LoRA keeps the bf16 copy of its input made by autocast for A, A's r-wide output for B,
#   and dropout's 1-byte mask when dropout > 0.
def layer_bytes(shape: Shape, setup: str) -> int:
    """Bytes per token one decoder layer keeps for backward, adapters aside."""
    if shape.family == "gpt2":
        return _gpt2_layer_bytes(shape, setup)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (4 * h + 4)  # fp32 input and fp32 1/rms per token
    attention = 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * shape.heads  # q, k, v, output, log-sum-exp
    mlp = 3 * i * (4 if setup == "adapter_4bit" else 2)
    if setup == "full":  # the norms' normalized inputs; the inputs of q/k/v, gate/up and down
        return norms + 2 * 2 * h + attention + mlp + 2 * h + 2 * h + 2 * i
    return norms + attention + mlp


def _gpt2_layer_bytes(shape: Shape, setup: str) -> int:
    """GPT-2: LayerNorm runs in fp32 under autocast; sdpa keeps q as a view of the bf16 qkv
    tensor and contiguous copies of k and v. A 4-bit base is modelled like a bf16 one."""
    h, i = shape.hidden, shape.intermediate
    norms = 2 * (4 * h + 8)
    attention = 2 * 3 * h + 2 * h + 2 * h + 2 * h + 4 * shape.heads  # qkv, k, v, output, log-sum-exp
    gelu = (4 + 4 + 2 + 4) * i if shape.gelu_new else 2 * i  # pow's fp32 input, tanh, x/2, 1+tanh
    dropout = 2 * h if shape.residual_dropout else 0
    saved = norms + attention + gelu + dropout
    if setup == "full":
        saved += 2 * h + 2 * h + 2 * i  # bf16 inputs of c_attn, c_fc, mlp.c_proj
    return saved


def head_bytes(shape: Shape, setup: str) -> int:
    """Bytes per token kept after the last layer: the final norm's fp32 input (and, when the
    head trains, the norm's and the head's bf16 inputs)."""
    kept = 4 * shape.hidden + (8 if shape.family == "gpt2" else 4)
    return kept + (4 * shape.hidden if setup == "full" else 0)


def checkpoint_bytes(shape: Shape, setup: str) -> int:
    """Bytes per token gradient checkpointing keeps per layer: the layer's input, the residual
    stream, which is fp32 when prepare_model_for_kbit_training upcast the embeddings."""
    return shape.hidden * (4 if setup == "adapter_4bit" else 2)


@dataclass(frozen=True)
class AdaptedLayer:
    """A layer peft wraps, as the activation model sees it."""

    in_features: int
    rank: int | None  # LoRA's r; None for other methods (modelled as keeping their input)
    dropout: bool
    in_block: bool  # inside a repeated decoder layer (recomputed under checkpointing)

    def bytes_per_token(self) -> int:
        if self.rank is None:
            return 2 * self.in_features
        return 2 * self.in_features + (self.in_features if self.dropout else 0) + 2 * self.rank


def adapted_layers(model) -> list[AdaptedLayer]:
    """The linear layers peft wrapped, with what their adapter keeps for backward."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not isinstance(module.get_base_layer(), (torch.nn.Linear, Conv1D)):
            continue
        adapter = module.active_adapters[0]
        rank = getattr(module, "r", {}).get(adapter)
        dropouts = getattr(module, "lora_dropout", {})
        dropout = dropouts[adapter] if adapter in dropouts else None
        found.append(AdaptedLayer(module.in_features, rank, isinstance(dropout, torch.nn.Dropout),
                                  re.search(r"\.\d+\.", name) is not None))
    return found


@dataclass
class Setup:
    """One way of training the model, in bytes at the peak of a training step."""

    label: str
    weights: int  # frozen weights
    trainable: int  # trainable parameters
    gradients: int
    optimizer: int  # the recipe's optimizer's states on torch's books
    optimizer_variants: dict  # optimizer → bytes of its states (paged ones: in CUDA managed memory)
    activations: int  # kept for backward, no checkpointing
    activations_checkpointed: int  # with gradient checkpointing
    logits: int  # logits and loss at the start of backward
    overhead: int = FRAMEWORK_OVERHEAD

    def total(self, checkpointing: bool) -> int:
        """Peak bytes. Gradients build up as activations are freed, so the larger of the two counts."""
        activations = self.activations_checkpointed if checkpointing else self.activations
        return (self.weights + self.trainable + self.optimizer + self.overhead
                + max(activations + self.logits, self.gradients))

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total(False), "total_checkpointed": self.total(True)}


@dataclass
class Estimate:
    batch_size: int
    seq_len: int
    optimizer: str
    gradient_checkpointing: bool
    selected: str  # the setup the recipe runs: adapter, adapter_4bit or (method full) full
    setups: dict[str, Setup]  # full, adapter, adapter_4bit
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """The estimated peak of the recipe's own setup."""
        return self.setups[self.selected].total(self.gradient_checkpointing)

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "optimizer": self.optimizer,
                "gradient_checkpointing": self.gradient_checkpointing, "selected": self.selected,
                "estimate_bytes": self.bytes, "estimate_gib": round(self.bytes / GIB, 3),
                "setups": {name: s.as_dict() for name, s in self.setups.items()}, "notes": self.notes}


@dataclass
class Census:
    """The skeleton's parameters and wrapped layers, gathered once for the three setups."""

    frozen: list[tuple[int, bool]]  # (numel, 4-bit quantizable) of each base parameter
    trained: list[tuple[tuple, int]]  # (shape, bytes per element) of each adapter parameter
    adapted: list[AdaptedLayer]

    @classmethod
    def of(cls, skeleton: Skeleton) -> Census:
        params = list(skeleton.model.parameters())
        return cls([(p.numel(), id(p) in skeleton.quantizable) for p in params if not p.requires_grad],
                   [(tuple(p.shape), p.element_size()) for p in params if p.requires_grad],
                   adapted_layers(skeleton.model))


SETUP_LABELS = {"full": "full fine-tuning", "adapter": "{method}", "adapter_4bit": "{method}, 4-bit base"}


def estimate(recipe: Recipe, skeleton: Skeleton, *, batch_size: int, seq_len: int) -> Estimate:
    """Peak GPU memory of a training step at `batch_size` rows of `seq_len` tokens, three ways."""
    shape = shape_of(skeleton.config)
    optimizer = "adamw_torch_fused" if recipe.train.optim == "auto" else recipe.train.optim
    census = Census.of(skeleton)
    dtype_bytes = training_dtype(recipe).itemsize
    full = recipe.method.name == "full"  # then the skeleton's trainable parameters are the model's own
    virtual = 0 if full else virtual_tokens(skeleton.model)
    setups = {name: _setup(name, census, shape, batch_size * (seq_len + (0 if name == "full" else virtual)),
                           optimizer, dtype_bytes, SETUP_LABELS[name].format(method=recipe.method.name),
                           full_skeleton=full)
              for name in (("full",) if full else SETUP_LABELS)}
    selected = "full" if full else "adapter_4bit" if is_4bit(recipe) else "adapter"
    notes = _notes(recipe, skeleton.config, shape)
    return Estimate(batch_size, seq_len, optimizer, recipe.train.gradient_checkpointing, selected, setups, notes)


def virtual_tokens(model) -> int:
    """Tokens prompt and p-tuning put before every row (prefix tuning adds them to attention's keys only)."""
    from peft import PeftType

    if methods.mixed.is_mixed(model):  # layer adapters only
        return 0
    config = model.active_peft_config
    if config.is_prompt_learning and config.peft_type != PeftType.PREFIX_TUNING:
        return config.num_virtual_tokens
    return 0


def _notes(recipe: Recipe, config, shape: Shape | None) -> list[str]:
    notes = []
    if shape is None:
        notes.append(f"no activation model for model_type '{config.model_type}': activations not counted")
    elif shape.family == "llama" and config.model_type not in ("llama", "mistral", "qwen2"):
        notes.append(f"{config.model_type} is modelled as a Llama-like decoder (RMSNorm, gated MLP)")
    if recipe.model.dtype == "float32":
        notes.append("the activation model assumes bf16/fp16 autocast; float32 training keeps about twice as much")
    return notes


def _setup(name: str, census: Census, shape: Shape | None, tokens: int, optimizer: str, dtype_bytes: int,
           label: str, full_skeleton: bool = False) -> Setup:
    if full_skeleton:  # method full: what it trains is what trains; frozen modules (trainable_modules) stay weights
        weights, trained = sum(numel for numel, _ in census.frozen) * dtype_bytes, census.trained
    elif name == "full":
        weights, trained = 0, [((numel,), dtype_bytes) for numel, _ in census.frozen]
    else:
        trained = census.trained
        weights = (_4bit_weight_bytes(census.frozen) if name == "adapter_4bit"
                   else sum(numel for numel, _ in census.frozen) * dtype_bytes)
    trainable = sum(math.prod(s) * b for s, b in trained)
    variants = {opt: optimizer_bytes(opt, trained) for opt in OPTIMIZERS}
    activations, checkpointed, logits = _activation_bytes(name, shape, census, tokens)
    return Setup(label, weights=weights, trainable=trainable, gradients=trainable,
                 optimizer=0 if optimizer in PAGED else optimizer_bytes(optimizer, trained),
                 optimizer_variants=variants, activations=activations, activations_checkpointed=checkpointed,
                 logits=logits)


def _4bit_weight_bytes(frozen: list[tuple[int, bool]]) -> int:
    """NF4 with double quantization for the layers transformers quantizes (per weight: 4 bits
    each, an 8-bit absmax per block, an fp32 absmax per 256 blocks and an fp32 offset); fp32
    for the rest, as prepare_model_for_kbit_training upcasts them."""
    total = 0
    for numel, quantizable in frozen:
        if not quantizable:
            total += 4 * numel
            continue
        blocks = math.ceil(numel / NF4_BLOCK)
        total += math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCKS_PER_ABSMAX2) + 4
    return total


def optimizer_bytes(optimizer: str, trained: list[tuple]) -> int:
    """Bytes of optimizer state for parameters given as (shape, bytes per element)."""
    total = 0
    for shape, element in trained:
        numel = math.prod(shape)
        if optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):  # 8-bit states, fp32 for small tensors
            small = numel < BNB_8BIT_MIN_SIZE
            total += 2 * (4 * numel if small else numel + 4 * math.ceil(numel / BNB_8BIT_BLOCK))
        elif optimizer == "paged_adamw_32bit":
            total += 2 * 4 * numel
        elif optimizer == "adafactor":  # factored second moment: a row and a column per matrix
            total += element * (sum(shape[-2:]) if len(shape) >= 2 else numel)
        elif optimizer != "sgd":  # AdamW: exp_avg and exp_avg_sq in the parameter's dtype
            total += 2 * element * numel
    return total


def _activation_bytes(setup: str, shape: Shape | None, census: Census, tokens: int) -> tuple[int, int, int]:
    """(no checkpointing, checkpointing, logits and loss) bytes for `tokens` tokens."""
    if shape is None:
        return 0, 0, 0
    adapted = [] if setup == "full" else census.adapted
    in_blocks = sum(a.bytes_per_token() for a in adapted if a.in_block)
    outside = sum(a.bytes_per_token() for a in adapted if not a.in_block)
    # autocast's bf16 copies of the fp32 adapter weights, kept for backward
    autocast_copies = 0 if setup == "full" else 2 * sum(math.prod(s) for s, _ in census.trained)
    per_layer = layer_bytes(shape, setup) + in_blocks / shape.layers
    head = head_bytes(shape, setup) + outside
    logits = LOSS_BYTES_PER_LOGIT * shape.vocab * tokens + _fp32_head_copy(setup, shape)
    plain = shape.layers * per_layer * tokens + head * tokens + autocast_copies
    kept = shape.layers * checkpoint_bytes(shape, setup) * tokens + head * tokens + autocast_copies
    recompute = (per_layer + 4 * shape.intermediate) * tokens  # one layer rebuilt, and its gradients
    checkpointed = kept + max(0, recompute - logits)  # the loss's buffers are gone by then
    return math.ceil(plain), math.ceil(checkpointed), logits


def _fp32_head_copy(setup: str, shape: Shape) -> int:
    """Under autocast an fp32 output head (4-bit setup) is cast to bf16 and that copy kept for backward."""
    return 2 * shape.vocab * shape.hidden if setup == "adapter_4bit" else 0


# ---------------------------------------------------------------------------------------
# Entry points


@dataclass
class Accounting:
    """count-params' answer: the model, the counts, the adapter file and the memory estimate."""

    recipe: Recipe
    architecture: str
    model_type: str
    counts: Counts
    memory: Estimate

    def as_dict(self) -> dict:
        c = self.counts
        return {
            "model": {"base": self.recipe.model.base, "architecture": self.architecture,
                      "model_type": self.model_type, "load_in_4bit": c.four_bit},
            "method": self.recipe.method.model_dump(mode="json"),
            "params": {"total": c.total, "trainable": c.trainable, "trainable_percent": c.trainable_percent,
                       "counted_as": COUNTED_AS_4BIT if c.four_bit else COUNTED_AS},
            "modules": [{"name": g.name, "modules": g.modules, "base_params_each": g.base_params_each,
                         "adapter_params_each": g.adapter_params_each, "params": g.params,
                         "trainable_params": g.trainable_params} for g in c.groups],
            "adapter_file": c.adapter_file,
            "memory": self.memory.as_dict(),
        }


COUNTED_AS = "peft's get_nb_trainable_parameters() on the model built on the meta device"
COUNTED_AS_4BIT = (COUNTED_AS + "; 4-bit layers as peft counts them: 2 parameters per stored byte "
                   "(the unquantized count, rounded up to even)")


def account(recipe: Recipe, *, batch_size: int | None = None, seq_len: int | None = None) -> Accounting:
    """Counts and memory for `recipe` at its batch size and max_length unless given."""
    skeleton = build_skeleton(recipe)
    counts = count(skeleton, is_4bit(recipe))
    memory = estimate(recipe, skeleton, batch_size=batch_size or recipe.train.batch_size,
                      seq_len=seq_len or recipe.data.max_length)
    architecture = type(methods.base_model(skeleton.model)).__name__
    return Accounting(recipe, architecture, skeleton.config.model_type, counts, memory)


def report_estimate(recipe: Recipe, *, batch_size: int, seq_len: int) -> dict:
    """The estimate that `peft train` writes beside the measured peak in report.json."""
    memory = estimate(recipe, build_skeleton(recipe), batch_size=batch_size, seq_len=seq_len)
    chosen = memory.setups[memory.selected]
    parts = {k: v for k, v in chosen.as_dict().items() if isinstance(v, int)}
    return {"bytes": memory.bytes, "gib": round(memory.bytes / GIB, 3), "batch_size": batch_size,
            "seq_len": seq_len, "setup": memory.selected, "gradient_checkpointing": memory.gradient_checkpointing,
            "parts": parts, "assumes": "a CUDA GPU, bf16 autocast, sdpa attention (peft count-params explains)"}
