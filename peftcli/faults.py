"""Numerical faults: a step whose loss or gradient is NaN or Inf (`train.on_nan`).

`stop` ends training before the step's update is applied and without saving it, so the
newest checkpoint is the last good one; the run then exits 1 naming the step. `skip_step`
leaves that step's update out and goes on. Either way the step is marked in the Trainer's
log history (FAULT_KEY), which checkpoints keep, so the report names such steps across
resumes and leaves their stand-in losses out of its loss curve.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from peftcli import distributed

FAULT_KEY = "nonfinite"  # marks a faulty step in state.log_history: "skipped" or "stopped"


class NonFiniteGuard(TrainerCallback):
    """Checks every training loss and, before each optimizer step, the gradients."""

    def __init__(self, action: str):
        self.action = action
        self.fault_step: int | None = None  # the step that stopped the run (on_nan: stop)
        self._bad_loss: torch.Tensor | None = None  # any non-finite loss since the last optimizer step
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_hook(self._see_loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _see_loss(self, module, inputs, output) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:  # kept on the device: no sync per micro-batch
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        checks = [] if self._bad_loss is None else [self._bad_loss]
        self._bad_loss = None
        if params and not args.fp16:  # with fp16, the grad scaler itself skips steps whose gradients overflow
            checks.append(~torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])))
        faulty = bool(checks) and bool(torch.stack([c.to(checks[0].device) for c in checks]).any().item())
        if not distributed.agreed_max(int(faulty), args.device):  # a NaN in one process stops (or skips) all
            return
        for p in params:
            p.grad = None  # the optimizer leaves a parameter without a gradient as it is
        step = state.global_step + 1
        state.log_history.append({FAULT_KEY: "skipped" if self.action == "skip_step" else "stopped", "step": step})
        if self.action == "stop":
            self.fault_step = step
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.fault_step is not None:
            control.should_save = False  # the newest checkpoint stays the last good one
