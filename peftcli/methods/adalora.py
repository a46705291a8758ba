"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, W + P Λ Q, whose rank budget moves during
training. Every layer starts at init_r; after the warm-up the least important singular values
are pruned every prune_every steps until the average rank is r; the last steps keep the ranks.
peft needs the run's length for that schedule, and a call after every optimizer step."""

from __future__ import annotations

from peftcli.errors import UserError


def peft_config(method, targets, steps: int | None):
    from peft import AdaLoraConfig

    if steps is None:  # the length is not known yet (peft validate without the data): check the schedule's shape only
        steps = 100
    tinit, tfinal = round(method.warmup_fraction * steps), round(method.final_fraction * steps)
    if tinit >= steps - tfinal:
        raise UserError(f"a run of {steps} steps leaves no step for pruning the rank budget "
                        f"(warm-up {tinit}, final {tfinal})", where="method.warmup_fraction",
                        hint="train for more steps, or lower warmup_fraction / final_fraction")
    return AdaLoraConfig(task_type="CAUSAL_LM", init_r=method.init_r, target_r=method.r, lora_alpha=method.alpha,
                         lora_dropout=method.dropout, target_modules=targets, tinit=tinit, tfinal=tfinal,
                         deltaT=method.prune_every, orth_reg_weight=method.orth_reg_weight, total_step=steps)


def budget_callback(model):
    """A Trainer callback that re-allocates the rank budget after each optimizer step (gradients still present)."""
    from transformers import TrainerCallback

    class RankAllocation(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return RankAllocation()
