"""LoRA linear layers computed in one autograd function: out = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.

peft's LoRA layer runs the low-rank path as separate modules: it casts the input to the
adapter's dtype (float32), multiplies by A, by B, scales and adds, each step a pass over an
activation-sized tensor in forward and again in backward, and autograd keeps a float32 copy
of the input per projection. Here the low-rank product is added inside the base matmul's
output (addmm in place), backward computes exactly the three products it needs, and only the
input (shared by q, k and v) and the r-wide x·Aᵀ are kept. The adapter's float32 weights are
used in the activations' dtype, as autocast does in peft's path.

It replaces the forward of peft `lora.Linear` layers over `nn.Linear` (and bitsandbytes 4-bit
`Linear4bit`, dequantized per use as bitsandbytes itself does) when the adapter is plain LoRA
with dropout 0; any other call (adapter disabled or merged, several adapters, dropout, DoRA,
mixed dtypes, extra arguments) goes through peft's own forward, so behaviour never changes.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch

# Whether this thread runs a checkpointed layer's recompute (autograd runs it in its own thread).
_recompute = threading.local()
# The attribute marking a LoRA layer whose output a checkpointed layer's recompute never uses
# (mark_unused_in_recompute).
UNUSED_IN_RECOMPUTE = "output_unused_in_recompute"


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ with W (and b) frozen; W comes from `base` at each use.

    The low-rank term is computed first (a rank-r product) and the base matmul adds onto it in
    cuBLAS's epilogue (addmm with beta 1), where reading it is hidden behind the matmul's compute;
    adding it afterwards would be one more pass over the output. Backward does the same for x's
    gradient. The scaling is applied to the r-wide tensors, never to an activation-sized one."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, output_unused=False):
        flat = x.reshape(-1, x.shape[-1])
        low = (flat @ lora_a.to(x.dtype).t()).mul_(scaling)  # s·x·Aᵀ, r wide
        ctx.save_for_backward(x, lora_a, lora_b, low)
        ctx.base = base
        ctx.scaling = scaling
        if output_unused:  # a recompute that needs only what is saved: the base matmul is skipped
            return flat.new_empty(*x.shape[:-1], base.out_features)
        up = lora_b.to(x.dtype).t()
        out = low @ up if base.bias is None else torch.addmm(base.bias.to(x.dtype), low, up)
        out.addmm_(flat, dense_weight(base, x.dtype).t())
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, low = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
        grad_low = (grad @ lora_b.to(x.dtype)).mul_(ctx.scaling)  # the gradient reaching x·Aᵀ
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_low @ lora_a.to(x.dtype)
            grad_x.addmm_(grad, dense_weight(ctx.base, x.dtype))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_low.t() @ x.reshape(-1, x.shape[-1])).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (grad.t() @ low).to(lora_b.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def dense_weight(base, dtype):
    """The base layer's weight as a dense matrix in `dtype` (4-bit weights dequantized)."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state).to(dtype)
    return weight


def fusable_base(base) -> bool:
    """A frozen nn.Linear, or a bitsandbytes 4-bit Linear4bit, with a frozen bias if any."""
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if type(base) is torch.nn.Linear:
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return type(base) is bnb.nn.Linear4bit


def fused_forward(self, x, *args, **kwargs):
    """The forward installed on a peft LoRA layer: fused when the call is plain LoRA, peft's otherwise."""
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    unused = getattr(self, UNUSED_IN_RECOMPUTE, False) and getattr(_recompute, "active", False)
    return LoraLinearFunction.apply(x, self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.base_layer,
                                    self.scaling[adapter], unused)


def mark_unused_in_recompute(layer) -> None:
    """Let `layer`'s fused forward skip its base matmul when a checkpointed layer is recomputed: the
    caller knows that nothing kept for backward is computed from its output (the last projection of a
    decoder layer, added to the residual stream, which keeps nothing). Recompute exists to rebuild what
    backward keeps, so that matmul would be thrown away: about a quarter of a Llama layer's forward matmuls.
    Measured against the code before it in one call (H200): 8B fast held to 24 GiB, 27 layers recomputed,
    13,145 and 13,130 tok/s against 12,356 and 12,328; QLoRA held to 9 GiB 12,313 and 12,403 against 11,556;
    lean 11,940 against 11,205 (another call). Layers the fused path never takes are left as they are."""
    if type(layer) in lora_layer_classes() and fusable_base(layer.base_layer):
        setattr(layer, UNUSED_IN_RECOMPUTE, True)


@contextlib.contextmanager
def _recomputing():
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = False


def checkpoint_contexts():
    """torch checkpoint's `context_fn`: nothing around the forward, the recompute marked as one."""
    return contextlib.nullcontext(), _recomputing()


def _plain_adapter(layer, x, args, kwargs) -> str | None:
    """The one active adapter's name when this call can take the fused path, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    adapter = plain_lora(layer)
    if adapter is None:
        return None
    base = layer.base_layer
    compute_dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
    if x.dtype != compute_dtype or not fusable_base(base):
        return None
    if torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != x.dtype:
        return None
    return adapter


def plain_lora(layer) -> str | None:
    """The adapter of a layer whose every call in training can be fused, as far as the layer itself
    decides (the call's input dtype decides the rest): one active plain-LoRA adapter, without
    dropout, DoRA or a bias on B."""
    if len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity) or layer.lora_B[adapter].bias is not None:
        return None
    return adapter


def lora_layer_classes() -> tuple[type, ...]:
    """peft's LoRA layers over a dense linear: nn.Linear, and bitsandbytes 4-bit when it is installed."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # bitsandbytes missing: peft does not define its 4-bit layer
        return (LoraLinear,)
    return LoraLinear, LoraLinear4bit


def install(model) -> int:
    """Give every plain-LoRA peft layer of `model` the fused forward; returns how many took it."""
    classes = lora_layer_classes()
    installed = 0
    for module in model.modules():
        if type(module) not in classes or not fusable_base(module.base_layer):
            continue
        module.forward = types.MethodType(fused_forward, module)
        installed += 1
    return installed


def uninstall(model) -> None:
    """Back to peft's forward everywhere."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType) and module.forward.__func__ is fused_forward:
            del module.forward
