"""Padding-free attention for packed rows: torch's flash-based varlen attention as a transformers
attention implementation.

A packed row holds several examples one after another, with `position_ids` restarting at 0
for each. Each example must attend causally to itself only. `varlen_attn` takes all tokens of
the batch as one (tokens, heads, head_dim) tensor and the cumulative sequence lengths
`cu_seqlens`, so no padding is computed and no mask is built. The lengths come from the
packing collator (`cu_seq_lens_q` / `max_length_q`, computed on the CPU) or, failing that,
from `position_ids` and the padding mask (computed once per forward and reused by every layer).

Registered with transformers' AttentionInterface as `peftcli_varlen`, together with the
flash-attention mask function (which hands over the 2D padding mask, or nothing).
"""

from __future__ import annotations

import functools
import inspect

import torch

NAME = "peftcli_varlen"


@functools.cache
def kernel():
    """torch's varlen attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available() -> bool:
    """True on a CUDA machine whose torch has varlen attention."""
    return torch.cuda.is_available() and kernel() is not None


def register() -> None:
    """Make `attn_implementation="peftcli_varlen"` known to transformers."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim);
    returns (batch, seq, heads, dim) and no attention weights."""
    if dropout:
        raise RuntimeError("varlen attention has no dropout; set model.attn_implementation: sdpa for this model")
    batch, heads, length, dim = query.shape
    cu_seqlens, max_len, keep = _bounds(kwargs, attention_mask, batch, length, query.device)

    def tokens(states):  # (batch, h, seq, dim) -> (tokens, h, dim), dropping padding
        flat = states.transpose(1, 2).reshape(batch * length, states.shape[1], dim)
        return flat if keep is None else flat[keep]

    out = _attend(tokens(query), tokens(key), tokens(value), cu_seqlens, max_len, scaling,
                  causal=getattr(module, "is_causal", True))
    if keep is not None:
        out = out.new_zeros(batch * length, heads, dim).index_put((keep,), out)
    return out.view(batch, length, heads, dim), None


def _attend(q, k, v, cu_seqlens, max_len, scaling, causal: bool):
    """The flash kernel takes q, k and v in one 16-bit dtype only; fp32 states (a QLoRA model's upcast
    norms feeding the projections outside autocast, IA3's fp32 scaling of k and v) are attended in the
    autocast dtype (else q's 16-bit dtype, else bf16) and returned in q's dtype."""
    sixteen_bit = (torch.float16, torch.bfloat16)
    if q.is_cuda and (q.dtype not in sixteen_bit or k.dtype != q.dtype or v.dtype != q.dtype):
        if torch.is_autocast_enabled("cuda"):
            low = torch.get_autocast_dtype("cuda")
        else:
            low = q.dtype if q.dtype in sixteen_bit else torch.bfloat16
        return _attend(q.to(low), k.to(low), v.to(low), cu_seqlens, max_len, scaling, causal).to(q.dtype)
    varlen_attn = kernel()
    params = _parameters()
    options = {}
    if "is_causal" in params:  # torch 2.9/2.10
        options["is_causal"] = causal
    else:  # torch 2.11+: causal is a window reaching back without limit and never forward
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    if scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        if "scale" not in params:
            raise RuntimeError("this torch's varlen attention has no scale argument and the model needs one; "
                               "set model.attn_implementation: sdpa")
        options["scale"] = scaling
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        options["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)


@functools.cache
def _parameters() -> frozenset[str]:
    return frozenset(inspect.signature(kernel()).parameters)


def _bounds(kwargs, attention_mask, batch: int, length: int, device):
    """(cu_seqlens int32, longest sequence, indices of non-padding tokens or None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and attention_mask is None and kwargs.get("max_length_q"):
        return cu.to(device=device, dtype=torch.int32), int(kwargs["max_length_q"]), None
    return _bounds_from_positions(kwargs.get("position_ids"), attention_mask, batch, length, device)


_last_bounds: tuple = (None, None, None)  # (position_ids, attention_mask, bounds) of the latest forward


def _bounds_from_positions(position_ids, attention_mask, batch: int, length: int, device):
    """A sequence starts at each position that does not follow its left neighbour, and after padding.

    Every layer of one forward passes the same position_ids and mask objects: compute once."""
    global _last_bounds
    if _last_bounds[0] is position_ids and _last_bounds[1] is attention_mask and position_ids is not None:
        return _last_bounds[2]
    positions = (torch.arange(length, device=device)[None] if position_ids is None else position_ids)
    positions = positions.to(device).expand(batch, length)
    starts = torch.ones(batch, length, dtype=torch.bool, device=device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    keep = None
    if attention_mask is not None:
        valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        starts[:, 1:] |= ~valid[:, :-1]
        keep = valid.flatten().nonzero().squeeze(1)
        starts = starts.flatten()[keep]
    else:
        starts = starts.flatten()
    first = starts.nonzero().squeeze(1)
    cu_seqlens = torch.cat([first, first.new_tensor([starts.numel()])]).to(torch.int32)
    bounds = cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), keep
    _last_bounds = (position_ids, attention_mask, bounds)
    return bounds
