"""What a recipe trains and what it needs, known before a single weight is loaded.

The model is built on PyTorch's meta device from its config (`models.build_empty`: shapes,
no memory) and the recipe's adapter is attached by peft itself (`methods.attach`), so the
parameter counts are peft's own `get_nb_trainable_parameters()`, equal by construction.

A 4-bit base is counted as peft counts it: bitsandbytes packs two 4-bit weights per stored
byte and peft multiplies each packed `Params4bit` by 2 × its storage size, which gives back
the unquantized count (rounded up to a whole storage element). The layers counted that way
are the ones transformers would quantize (every linear layer but the output head).

The memory estimate models one step of `peft train` on a CUDA GPU: the HF Trainer under bf16
autocast, AdamW states created, through the speed settings the run resolves (SpeedPath: packing,
varlen or sdpa attention, liger kernels, fused LoRA, checkpointed layers, activation offload;
speed.plan resolves them for a run, speed.estimate_on_a_gpu for count-params, and speed chooses
how many layers to checkpoint with this estimate), and counts what `torch.cuda.max_memory_allocated()`
sees. Its parts:
- weights: bf16 (2 bytes/param), or NF4 with double quantization: 4 bits per weight, one
  8-bit absmax per block of 64 weights and one fp32 absmax per 256 blocks; the layers
  transformers does not quantize stay in the training dtype (fp32 under fp16, which
  methods.prepare_4bit_base upcasts);
- trainable parameters, their gradients and the optimizer's states, in the parameters'
  dtype (peft keeps adapters in fp32) or as the 8-bit / paged optimizers keep them;
- activations saved for backward, per decoder layer, from the shapes of the layer's tensors
  (layer_bytes, AdaptedLayer), for the step's tokens (a packed step: its token budget; padded
  rows: rows × the longest), none for an offloaded checkpointed layer's input;
- the output head and the loss: transformers' fp32 logits and their gradients, or liger's fused
  linear + cross-entropy, which holds one chunk of logits at a time (loss_bytes);
- framework overhead: inputs, cuBLAS workspaces and small buffers. The CUDA context (~0.5 GiB)
  is outside torch's allocator: max_memory_allocated does not count it, nor does the estimate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

from peftcli import cpu_embedding, methods, models
from peftcli.recipe import Recipe

GIB = 2**30
NF4_BLOCK = 64  # weights per absmax in bitsandbytes' 4-bit quantization
NF4_BLOCKS_PER_ABSMAX2 = 256  # double quantization: absmaxes per second-level fp32 scale
BNB_8BIT_BLOCK = 256  # bitsandbytes' 8-bit optimizers: elements per fp32 absmax
BNB_8BIT_MIN_SIZE = 4096  # smaller tensors keep fp32 states in the 8-bit optimizers
LOSS_BYTES_PER_LOGIT = 12  # fp32 log-softmax + its gradient + the loss gradient, alive together
FRAMEWORK_OVERHEAD = 64 * 2**20  # inputs, cuBLAS workspaces, small buffers: 0-50 MiB measured on an H100
BACKWARD_BYTES_PER_INTERMEDIATE = 4  # one layer's backward: about two bf16 gradients of the MLP's width per token
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
PAGED = ("paged_adamw_8bit", "paged_adamw_32bit")  # states in CUDA managed memory, off torch's books


# ---------------------------------------------------------------------------------------
# The skeleton: the model with its adapter on the meta device


def is_4bit(recipe: Recipe) -> bool:
    """Whether the recipe loads its base in 4-bit (the qlora method implies it)."""
    return recipe.model.load_in_4bit or recipe.method.name == "qlora"


def optimizer_for(train, *, cuda: bool) -> str:
    """The optimizer train.optim: auto resolves to: fused AdamW on a GPU, AdamW on a CPU; under the lean
    profile on a GPU, bitsandbytes' 8-bit AdamW (a quarter of the states' memory: 0.23 GiB at 8B, r=16)."""
    if train.optim != "auto":
        return train.optim
    if not cuda:
        return "adamw_torch"
    return "adamw_bnb_8bit" if train.profile == "lean" else "adamw_torch_fused"


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
    base = models.build_empty(config, dtype=training_dtype(recipe), trust_remote_code=m.trust_remote_code)
    quantizable = {id(module.weight) for module in quantizable_layers(base)}
    method = recipe.method
    if getattr(method, "init", None) in ("pissa", "olora", "loftq"):  # initial values computed from the
        method = method.model_copy(update={"init": "default"})  # weights: none here, and no shape changes
    with torch.device("meta"):  # peft creates the adapter where the default device says: here, nowhere
        model = methods.attach(base, method, empty=True)
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
class SpeedPath:
    """The speed settings of `peft train` that change its memory, as speed.plan resolves them: for the
    run on this machine (peft train), or as a CUDA GPU would (peft count-params)."""

    profile: str = "fast"
    packing: bool = False
    attention: str = "sdpa"  # varlen or sdpa (eager and flex_attention are modelled as sdpa)
    liger_kernels: bool = False  # liger's RMSNorm, RoPE, SwiGLU and fused linear + cross-entropy
    fused_lora: bool = False
    offload_activations: bool = False  # the checkpointed layers' inputs in CPU memory
    offload_embeddings: bool = False  # the input embedding table in CPU memory (cpu_embedding)


@dataclass(frozen=True)
class Step:
    """The tokens of one training step: `rows` rows of `length` tokens (a packed step is one row)."""

    rows: int
    length: int
    masked: bool = False  # sdpa gets an attention mask: padded rows, or packed rows without varlen

    @property
    def tokens(self) -> int:
        return self.rows * self.length


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
# autograd holds (tests/test_params.py on the CPU, tests/test_gpu_memory.py on a GPU); the terms,
# for a Llama layer:
#   residual stream: bf16, or fp32 on a 4-bit base trained in fp16 (methods.prepare_4bit_base upcasts the
#            embeddings, and 4-bit layers return their input's dtype);
#   norms:   transformers' RMSNorm keeps an fp32 copy of its input and the fp32 1/rms per token (+ the
#            bf16 normalized input for the weight's gradient when the norm trains); liger's keeps its
#            input as it is and the fp32 1/rms;
#   attention: flash (sdpa without a mask, or varlen) keeps q, k, v and its output in bf16 and the
#            fp32 log-sum-exp per head; given a mask (padded rows, or packed rows without varlen),
#            transformers repeats k and v to every head and sdpa keeps a bf16 copy of the mask per layer;
#   MLP:     act(gate) · up keeps gate, act(gate) and up in the residual's dtype; liger's SwiGLU keeps
#            gate and up only;
#   frozen linear layers keep nothing (a frozen weight needs no input for its gradient);
#   trained linear layers keep their inputs (full fine-tuning).
# The adapters' own terms are in AdaptedLayer.
def layer_bytes(shape: Shape, setup: str, *, liger: bool = False, mask_length: int = 0, residual: int = 2) -> int:
    """Bytes per token one decoder layer keeps for backward, adapters aside; `mask_length`: the row
    length when attention gets a mask; `residual`: bytes per element of the residual stream (residual_bytes)."""
    if shape.family == "gpt2":
        return _gpt2_layer_bytes(shape, setup, mask_length)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (residual * h + 4 if liger else 4 * h + 4)
    keys = q if mask_length else kv  # k and v, repeated to every head under a mask
    attention = 2 * q + 2 * keys + 2 * keys + 2 * q + 4 * shape.heads + 2 * mask_length
    mlp = (2 if liger else 3) * i * residual
    if setup == "full":  # the inputs of q/k/v, gate/up and down; transformers' norms their normalized inputs
        return norms + (0 if liger else 2 * 2 * h) + attention + mlp + 2 * h + 2 * h + 2 * i
    return norms + attention + mlp


def residual_bytes(setup: str, dtype) -> int:
    """Bytes per element of the residual stream when training in `dtype`: fp32 on a 4-bit base whose
    unquantized weights methods.prepare_4bit_base upcasts (fp16 training), else 16-bit."""
    return 4 if setup == "adapter_4bit" and methods.upcasts_4bit_base(dtype) else 2


def _gpt2_layer_bytes(shape: Shape, setup: str, mask_length: int) -> int:
    """GPT-2: LayerNorm runs in fp32 under autocast; sdpa keeps q as a view of the bf16 qkv
    tensor and contiguous copies of k and v. A 4-bit base is modelled like a bf16 one."""
    h, i = shape.hidden, shape.intermediate
    norms = 2 * (4 * h + 8)
    attention = 2 * 3 * h + 2 * h + 2 * h + 2 * h + 4 * shape.heads + 2 * mask_length  # qkv, k, v, output, lse, mask
    gelu = (4 + 4 + 2 + 4) * i if shape.gelu_new else 2 * i  # pow's fp32 input, tanh, x/2, 1+tanh
    dropout = 2 * h if shape.residual_dropout else 0
    saved = norms + attention + gelu + dropout
    if setup == "full":
        saved += 2 * h + 2 * h + 2 * i  # bf16 inputs of c_attn, c_fc, mlp.c_proj
    return saved


def head_bytes(shape: Shape, setup: str, *, liger: bool = False, residual: int = 2) -> int:
    """Bytes per token kept after the last layer: the final norm's (and, when the head trains without
    liger, the norm's and the head's bf16 inputs). liger's loss keeps no input (see loss_bytes)."""
    if liger:
        return residual * shape.hidden + 4
    kept = 4 * shape.hidden + (8 if shape.family == "gpt2" else 4)
    return kept + (4 * shape.hidden if setup == "full" else 0)


def checkpoint_bytes(shape: Shape, residual: int = 2) -> int:
    """Bytes per token gradient checkpointing keeps per layer: the layer's input, the residual stream."""
    return shape.hidden * residual


def loss_bytes(shape: Shape, setup: str, tokens: int, *, liger: bool = False, residual: int = 2) -> int:
    """Bytes the output head and the loss hold at their peak, at the end of the forward.

    transformers upcasts the logits to fp32; at the start of backward the fp32 log-softmax, its
    gradient and the gradient of the loss are alive at once: 12 bytes per vocabulary entry per token.
    liger's fused linear + cross-entropy never holds the logits: it computes the gradient of its
    input during the forward and keeps it for backward (in the input's dtype), with the fp32 loss per
    token and one chunk of bf16 logits at a time (liger_chunk_rows). Modelled from liger-kernel
    0.8.5's source (ops/fused_linear_cross_entropy.py); liger does not run on a CPU, so this term is
    checked by tests/test_gpu_memory.py only.

    On a 4-bit base upcast to fp32 (residual 4) the head is fp32 and autocast casts it to bf16 for its
    matmul: transformers keeps that copy for backward, liger makes one per chunk. A trained head (full
    fine-tuning) gets its gradient during liger's forward."""
    head_copy = 2 * shape.vocab * shape.hidden if setup == "adapter_4bit" and residual == 4 else 0
    if not liger:
        return LOSS_BYTES_PER_LOGIT * shape.vocab * tokens + head_copy
    input_gradient = residual * shape.hidden * tokens
    head_gradient = 2 * shape.vocab * shape.hidden if setup == "full" else 0
    chunk = 2 * liger_chunk_rows(tokens, shape) * shape.vocab
    return input_gradient + 4 * tokens + chunk + head_copy + head_gradient


def liger_chunk_rows(tokens: int, shape: Shape) -> int:
    """Tokens whose logits liger's fused linear + cross-entropy computes at once (liger-kernel 0.8.5):
    the next power of 2 of tokens / ceil(vocab / hidden), at most all of them."""
    rows = math.ceil(tokens / math.ceil(shape.vocab / shape.hidden))
    return min(1 << (rows - 1).bit_length(), tokens)


# What the fused LoRA function keeps as each projection's input (fused_lora.LoraLinearFunction saves
# its input tensor and the r-wide x·Aᵀ): q, k and v read one tensor, so do gate and up; o_proj reads
# the attention's output, which attention keeps anyway.
FUSED_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                "o_proj": "attention output", "gate_proj": "MLP input", "up_proj": "MLP input",
                "down_proj": "MLP product"}
KEPT_BY_ATTENTION = "attention output"


@dataclass(frozen=True)
class AdaptedLayer:
    """A layer peft wraps, as the activation model sees it."""

    name: str  # the module's path
    in_features: int
    out_features: int
    rank: int | None  # LoRA's r; None for other methods (modelled as keeping their input)
    dropout: bool
    in_block: bool  # inside a repeated decoder layer (recomputed under checkpointing)
    fusable: bool  # plain LoRA on a dense linear: the fused LoRA function computes it (train.fused_lora)

    def bytes_per_token(self) -> int:
        """Through peft's forward: LoRA keeps the bf16 copy of its input made by autocast for A,
        A's r-wide output for B, and dropout's 1-byte mask when dropout > 0."""
        if self.rank is None:
            return 2 * self.in_features
        return 2 * self.in_features + (self.in_features if self.dropout else 0) + 2 * self.rank

    def fused_input(self) -> tuple[str, str]:
        """The tensor the fused function keeps as this layer's input: (parent module, what it is)."""
        parent, leaf = self.name.rsplit(".", 1)
        return parent, FUSED_INPUTS.get(leaf, leaf)

    @property
    def adapter_params(self) -> int:
        return (self.rank or 0) * (self.in_features + self.out_features)


def adapted_layers(model) -> list[AdaptedLayer]:
    """The linear layers peft wrapped, with what their adapter keeps for backward."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    from peftcli import fused_lora

    found = []
    lora_classes = fused_lora.lora_layer_classes()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not isinstance(module.get_base_layer(), (torch.nn.Linear, Conv1D)):
            continue
        adapter = module.active_adapters[0]
        rank = getattr(module, "r", {}).get(adapter)
        dropouts = getattr(module, "lora_dropout", {})
        dropout = dropouts[adapter] if adapter in dropouts else None
        fusable = (type(module) in lora_classes and fused_lora.fusable_base(module.get_base_layer())
                   and fused_lora.plain_lora(module) is not None)
        found.append(AdaptedLayer(name, module.in_features, module.out_features, rank,
                                  isinstance(dropout, torch.nn.Dropout), re.search(r"\.\d+\.", name) is not None,
                                  fusable))
    return found


def takes_fused_path(layer: AdaptedLayer, setup: str, path: SpeedPath, residual: int = 2) -> bool:
    """Whether the fused LoRA function computes `layer` in `setup`. It takes activations in the compute
    dtype only (fused_lora._plain_adapter): a 4-bit base upcast to fp32 (residual 4) feeds its layers fp32
    (the residual stream, and 4-bit layers return their input's dtype), all but the attention's output
    under sdpa, which autocast made bf16 (varlen returns its fp32 input's dtype)."""
    if not (path.fused_lora and layer.fusable) or setup == "full":
        return False
    if residual == 4:
        return layer.fused_input()[1] == KEPT_BY_ATTENTION and path.attention != "varlen"
    return True


def adapter_bytes_per_token(adapted: list[AdaptedLayer], fused: set[str]) -> tuple[int, int]:
    """Bytes per token the adapted layers keep (inside the decoder layers, outside them); the layers
    named in `fused` as the fused function keeps them, a tensor read by several layers once."""
    inside = outside = 0
    inputs_kept: set[tuple[str, str]] = set()
    for layer in adapted:
        if layer.name in fused:
            source = layer.fused_input()
            new_input = source not in inputs_kept and source[1] != KEPT_BY_ATTENTION
            inputs_kept.add(source)
            kept = 2 * layer.rank + (2 * layer.in_features if new_input else 0)
        else:
            kept = layer.bytes_per_token()
        if layer.in_block:
            inside += kept
        else:
            outside += kept
    return inside, outside


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one step, for any number of checkpointed layers (the first ones: the last
    layers are back-propagated first, so theirs go before any recompute)."""

    layers: int
    per_layer: int  # kept by one decoder layer that is not checkpointed
    checkpoint: int  # kept by one checkpointed layer: its input
    offload: bool  # the checkpointed inputs live in CPU memory; one comes back for its recompute
    head: int  # after the last layer, adapters outside the decoder layers, autocast's bf16 adapter copies
    loss: int  # the output head and the loss at their peak (loss_bytes)
    working: int  # the gradients of the layer being back-propagated

    def kept(self, checkpointed: int) -> int:
        """Kept for backward at the end of the forward."""
        k = min(checkpointed, self.layers)
        return (self.layers - k) * self.per_layer + (0 if self.offload else k * self.checkpoint) + self.head

    def peak(self, checkpointed: int) -> int:
        """The larger of the forward's end (loss buffers, or the last layer's gradients) and the
        recompute of the last checkpointed layer (its activations rebuilt, and their gradients)."""
        k = min(checkpointed, self.layers)
        end_of_forward = self.kept(k) + max(self.loss, self.working)
        if not k:
            return end_of_forward
        inputs = self.checkpoint if self.offload else k * self.checkpoint
        return max(end_of_forward, inputs + self.per_layer + self.working + self.head)


NO_ACTIVATIONS = Activations(0, 0, 0, False, 0, 0, 0)


@dataclass
class Setup:
    """One way of training the model, in bytes at the peak of a training step."""

    label: str
    weights: int  # frozen weights
    trainable: int  # trainable parameters
    gradients: int
    optimizer: int  # the recipe's optimizer's states on torch's books
    optimizer_variants: dict  # optimizer → bytes of its states (paged ones: in CUDA managed memory)
    memory: Activations
    overhead: int = FRAMEWORK_OVERHEAD

    def activations(self, checkpointed: int) -> int:
        """Activations at the step's peak, beyond the loss buffers (`logits`)."""
        return self.memory.peak(checkpointed) - self.memory.loss

    def total(self, checkpointed: int) -> int:
        """Peak bytes. Gradients build up as activations are freed, so the larger of the two counts."""
        return (self.weights + self.trainable + self.optimizer + self.overhead
                + max(self.memory.peak(checkpointed), self.gradients))

    def as_dict(self, checkpointed: int) -> dict:
        layers = self.memory.layers
        return {"label": self.label, "weights": self.weights, "trainable": self.trainable,
                "gradients": self.gradients, "optimizer": self.optimizer, "optimizer_variants": self.optimizer_variants,
                "activations": self.activations(0), "activations_checkpointed": self.activations(layers),
                "activations_per_layer": self.memory.per_layer, "logits": self.memory.loss, "overhead": self.overhead,
                "total": self.total(0), "total_checkpointed": self.total(layers),
                "total_planned": self.total(checkpointed)}


@dataclass
class Estimate:
    """Peak memory of a training step for the three setups, and the recipe's own (`selected`, `checkpointed`)."""

    batch_size: int  # the recipe's rows per step and tokens per row, as given
    seq_len: int
    step: Step  # what one step holds under the speed settings (packed: one row of the token budget)
    optimizer: str
    path: SpeedPath
    layers: int  # decoder layers
    checkpointed: int  # of them, checkpointed (speed decides; see speed.choose_checkpointing)
    selected: str  # the setup the recipe runs: adapter, adapter_4bit or (method full) full
    setups: dict[str, Setup]  # full, adapter, adapter_4bit
    notes: list[str] = field(default_factory=list)

    def peak(self, checkpointed: int | None = None) -> int:
        """The estimated peak of the recipe's own setup, with the planned or the given checkpointed layers."""
        return self.setups[self.selected].total(self.checkpointed if checkpointed is None else checkpointed)

    @property
    def bytes(self) -> int:
        return self.peak()

    def static_bytes(self, setup: str | None = None) -> int:
        """What the recipe's own setup (or `setup`) holds whatever the step: weights, adapter, optimizer
        states, overhead."""
        s = self.setups[setup or self.selected]
        return s.weights + s.trainable + s.optimizer + s.overhead

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "tokens": self.step.tokens,
                "rows": self.step.rows, "optimizer": self.optimizer, "speed": asdict(self.path),
                "layers": self.layers, "checkpointed_layers": self.checkpointed,
                "gradient_checkpointing": self.checkpointed > 0, "selected": self.selected,
                "estimate_bytes": self.bytes, "estimate_gib": round(self.bytes / GIB, 3),
                "setups": {name: s.as_dict(self.checkpointed) for name, s in self.setups.items()}, "notes": self.notes}


@dataclass
class Census:
    """The skeleton's parameters and wrapped layers, gathered once for the three setups."""

    frozen: list[tuple[int, bool]]  # (numel, 4-bit quantizable) of each base parameter
    trained: list[tuple[tuple, int]]  # (shape, bytes per element) of each adapter parameter
    adapted: list[AdaptedLayer]
    input_embedding: int  # elements of the input embedding table when it can live in CPU memory, else 0

    @classmethod
    def of(cls, skeleton: Skeleton) -> Census:
        params = list(skeleton.model.parameters())
        table = cpu_embedding.offloadable(methods.base_model(skeleton.model))
        return cls([(p.numel(), id(p) in skeleton.quantizable) for p in params if not p.requires_grad],
                   [(tuple(p.shape), p.element_size()) for p in params if p.requires_grad],
                   adapted_layers(skeleton.model), table.weight.numel() if table is not None else 0)


SETUP_LABELS = {"full": "full fine-tuning", "adapter": "{method}", "adapter_4bit": "{method}, 4-bit base"}


def estimate(recipe: Recipe, skeleton: Skeleton, *, batch_size: int, seq_len: int, step: Step | None = None,
             path: SpeedPath = SpeedPath(), checkpointed: int = 0) -> Estimate:
    """Peak GPU memory of a training step, three ways: `batch_size` rows of `seq_len` tokens, or the
    `step` the speed settings make of them, through `path`, with the first `checkpointed` layers checkpointed."""
    shape = shape_of(skeleton.config)
    optimizer = optimizer_for(recipe.train, cuda=True)
    census = Census.of(skeleton)
    step = step or Step(batch_size, seq_len)
    full = recipe.method.name == "full"  # then the skeleton's trainable parameters are the model's own
    virtual = 0 if full else virtual_tokens(skeleton.model)
    setups = {name: _setup(name, census, shape, step, virtual, path, optimizer, training_dtype(recipe),
                           SETUP_LABELS[name].format(method=recipe.method.name), full_skeleton=full)
              for name in (("full",) if full else SETUP_LABELS)}
    selected = "full" if full else "adapter_4bit" if is_4bit(recipe) else "adapter"
    notes = _notes(recipe, skeleton.config, shape, path)
    return Estimate(batch_size, seq_len, step, optimizer, path, shape.layers if shape else 0, checkpointed,
                    selected, setups, notes)


def virtual_tokens(model) -> int:
    """Tokens prompt and p-tuning put before every row (prefix tuning adds them to attention's keys only)."""
    from peft import PeftType

    if methods.mixed.is_mixed(model):  # layer adapters only
        return 0
    config = model.active_peft_config
    if config.is_prompt_learning and config.peft_type != PeftType.PREFIX_TUNING:
        return config.num_virtual_tokens
    return 0


def _notes(recipe: Recipe, config, shape: Shape | None, path: SpeedPath) -> list[str]:
    notes = []
    if shape is None:
        notes.append(f"no activation model for model_type '{config.model_type}': activations not counted")
    elif shape.family == "llama" and config.model_type not in ("llama", "mistral", "qwen2"):
        notes.append(f"{config.model_type} is modelled as a Llama-like decoder (RMSNorm, gated MLP)")
    if recipe.model.dtype == "float32":
        notes.append("the activation model assumes bf16/fp16 autocast; float32 training keeps about twice as much")
    if path.attention not in ("varlen", "sdpa"):
        notes.append(f"{path.attention} attention is modelled as sdpa's flash kernel (eager also keeps the "
                     "attention weights: more)")
    return notes


def _setup(name: str, census: Census, shape: Shape | None, step: Step, virtual: int, path: SpeedPath,
           optimizer: str, dtype, label: str, full_skeleton: bool = False) -> Setup:
    dtype_bytes, residual = dtype.itemsize, residual_bytes(name, dtype)
    if full_skeleton:  # method full: what it trains is what trains; frozen modules (trainable_modules) stay weights
        weights, trained = sum(numel for numel, _ in census.frozen) * dtype_bytes, census.trained
    elif name == "full":
        weights, trained = 0, [((numel,), dtype_bytes) for numel, _ in census.frozen]
    else:
        trained = census.trained
        weights = (_4bit_weight_bytes(census.frozen, residual) if name == "adapter_4bit"
                   else sum(numel for numel, _ in census.frozen) * dtype_bytes)
        if path.offload_embeddings:  # an unquantized table, in the training dtype (or upcast: the residual's)
            weights -= census.input_embedding * (residual if name == "adapter_4bit" else dtype_bytes)
    trainable = sum(math.prod(s) * b for s, b in trained)
    variants = {opt: optimizer_bytes(opt, trained) for opt in OPTIMIZERS}
    return Setup(label, weights=weights, trainable=trainable, gradients=trainable,
                 optimizer=0 if optimizer in PAGED else optimizer_bytes(optimizer, trained),
                 optimizer_variants=variants, memory=_activations(name, shape, census, step, virtual, path, residual))


def _4bit_weight_bytes(frozen: list[tuple[int, bool]], unquantized_bytes: int = 2) -> int:
    """NF4 with double quantization for the layers transformers quantizes (per weight: 4 bits
    each, an 8-bit absmax per block, an fp32 absmax per 256 blocks and an fp32 offset); the rest
    in the training dtype, or fp32 where methods.prepare_4bit_base upcasts them."""
    total = 0
    for numel, quantizable in frozen:
        if not quantizable:
            total += unquantized_bytes * numel
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


def _activations(setup: str, shape: Shape | None, census: Census, step: Step, virtual: int,
                 path: SpeedPath, residual: int) -> Activations:
    """The setup's activations for `step` through the speed path; `residual`: residual_bytes."""
    if shape is None:
        return NO_ACTIVATIONS
    tokens = step.tokens + (0 if setup == "full" else step.rows * virtual)
    adapted = [] if setup == "full" else census.adapted
    fused = {a.name for a in adapted if takes_fused_path(a, setup, path, residual)}
    inside, outside = adapter_bytes_per_token(adapted, fused)
    # autocast's bf16 copies of the fp32 adapter weights peft's forward uses, kept for backward
    # (the fused function casts its own and keeps none)
    copied = sum(math.prod(s) for s, _ in census.trained) - sum(a.adapter_params for a in adapted if a.name in fused)
    liger = path.liger_kernels and shape.family == "llama"
    mask = step.length if step.masked else 0
    per_layer = layer_bytes(shape, setup, liger=liger, mask_length=mask, residual=residual) + inside / shape.layers
    return Activations(
        layers=shape.layers, per_layer=math.ceil(per_layer * tokens),
        checkpoint=checkpoint_bytes(shape, residual) * tokens, offload=path.offload_activations,
        head=(head_bytes(shape, setup, liger=liger, residual=residual) + outside) * tokens
        + (0 if setup == "full" else 2 * copied),
        loss=loss_bytes(shape, setup, tokens, liger=liger, residual=residual),
        working=BACKWARD_BYTES_PER_INTERMEDIATE * shape.intermediate * tokens)


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
    """Counts and memory for `recipe` at its batch size and max_length unless given; the memory as
    `peft train` would run it on a CUDA GPU (speed.estimate_on_a_gpu resolves its speed settings)."""
    from peftcli import speed  # speed plans with this module's estimate

    skeleton = build_skeleton(recipe)
    counts = count(skeleton, is_4bit(recipe))
    memory = speed.estimate_on_a_gpu(recipe, skeleton, batch_size=batch_size or recipe.train.batch_size,
                                     seq_len=seq_len or recipe.data.max_length)
    architecture = type(methods.base_model(skeleton.model)).__name__
    return Accounting(recipe, architecture, skeleton.config.model_type, counts, memory)


def report_estimate(memory: Estimate) -> dict:
    """The estimate that `peft train` writes beside the measured peak in report.json: its own run's
    (speed.plan made it, with the run's step, speed settings and checkpointed layers)."""
    chosen, k = memory.setups[memory.selected], memory.checkpointed
    parts = {"weights": chosen.weights, "trainable": chosen.trainable, "gradients": chosen.gradients,
             "optimizer": chosen.optimizer, "activations": chosen.activations(k), "logits": chosen.memory.loss,
             "overhead": chosen.overhead}
    return {"bytes": memory.bytes, "gib": round(memory.bytes / GIB, 3), "batch_size": memory.batch_size,
            "seq_len": memory.seq_len, "tokens": memory.step.tokens, "rows": memory.step.rows,
            "setup": memory.selected, "checkpointed_layers": k, "speed": asdict(memory.path), "parts": parts,
            "assumes": "a CUDA GPU, bf16 autocast, the run's speed settings (peft count-params explains)"}
