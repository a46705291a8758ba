"""LoRA (Hu et al., 2021): h = W x + (alpha / r) · B A x, with A: r×in, B: out×r, B = 0 at start."""

from __future__ import annotations


def peft_config(method, targets):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                      target_modules=targets, bias=method.bias)
