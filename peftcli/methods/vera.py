"""VeRA (Kopiczko et al., 2024): h = W x + Λ_b B Λ_d A x, where A and B are frozen random
matrices shared by every layer (regenerated from a seed) and only the vectors b (zero at start)
and d are trained."""

from __future__ import annotations


def peft_config(method, targets):
    from peft import VeraConfig

    return VeraConfig(task_type="CAUSAL_LM", r=method.r, target_modules=targets, d_initial=method.d_initial,
                      vera_dropout=method.dropout, projection_prng_key=method.projection_seed,
                      save_projection=True)
