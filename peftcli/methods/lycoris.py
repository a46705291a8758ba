"""LyCORIS methods (nn.Linear layers only in peft):

- LoHa (Hyeon-Woo et al., 2022): ΔW = (alpha/r) · (B₁A₁) ⊙ (B₂A₂), one factor zero at start;
- LoKr (Yeh et al., 2024): ΔW = (alpha/r) · C ⊗ (BA), the low-rank factor zero at start.
"""

from __future__ import annotations


def peft_config(method, targets):
    from peft import LoHaConfig, LoKrConfig

    common = dict(task_type="CAUSAL_LM", r=method.r, alpha=method.alpha, rank_dropout=method.rank_dropout,
                  module_dropout=method.module_dropout, target_modules=targets)
    if method.name == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(**common, decompose_both=method.decompose_both, decompose_factor=method.decompose_factor)
