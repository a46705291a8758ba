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
    """Checks every training loss and, before each optimizer step, the gradients.

    Asking the GPU whether a step was faulty makes the host wait for it, and the GPU then idles
    while the host prepares the next step (with the Trainer's own such waits, 6 to 17% of an 8B step
    on an H100; README, Performance). With torch's fused Adam or AdamW in one process (the GPU
    default) the guard does not ask: the optimizer skips a faulty step on the GPU itself (its
    `found_inf`, as under a grad scaler), and the verdict is read later from a page-locked copy: at
    the next step that logs, saves or evaluates (which waits for the GPU anyway), else before the
    next update. A `stop` learnt there also leaves that next update out, so the weights are those
    from before the faulty step, as when waiting."""

    def __init__(self, action: str):
        self.action = action
        self.fault_step: int | None = None  # the step that stopped the run (on_nan: stop)
        self._bad_loss: torch.Tensor | None = None  # any non-finite loss since the last optimizer step
        self._last_finite_loss: torch.Tensor | None = None
        self._pending: list[tuple[int, _Verdict]] = []  # steps skipped on the device, their verdict unread
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_hook(self._see_loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._settle(state, control)

    def _see_loss(self, module, inputs, output) -> None:
        """Notes a non-finite loss on the device (no wait) and hands the Trainer the last finite one
        instead, whose running sum of logged losses would otherwise stay NaN for the rest of the run;
        the report leaves such a step's logged loss out."""
        loss = getattr(output, "loss", None)
        if not module.training or loss is None:
            return
        finite = torch.isfinite(loss.detach()).all()
        self._bad_loss = ~finite if self._bad_loss is None else self._bad_loss | ~finite
        last = torch.zeros_like(loss.detach()) if self._last_finite_loss is None else self._last_finite_loss
        self._last_finite_loss = torch.where(finite, loss.detach(), last)
        output.loss = torch.where(finite, loss, self._last_finite_loss)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        checks = [] if self._bad_loss is None else [self._bad_loss]
        self._bad_loss = None
        if params and not args.fp16:  # with fp16, the grad scaler itself skips steps whose gradients overflow
            checks.append(~torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])))
        faulty = torch.stack([c.to(checks[0].device) for c in checks]).any() if checks else None  # on the device
        skipper = _skips_on_device(optimizer, args)
        if skipper is None:
            # a NaN in one process stops (or skips) all
            if distributed.agreed_max(int(faulty is not None and bool(faulty.item())), args.device):
                self._mark(state.global_step + 1, state, control, params)
            return
        self._settle(state, control)  # earlier steps' verdicts, long computed by now
        if faulty is None:
            faulty = torch.zeros((), dtype=torch.bool, device=args.device)
        if self.fault_step is not None:  # an earlier step stopped the run: this update is left out too
            faulty = torch.ones_like(faulty)
        skipper.found_inf = faulty.float()
        self._pending.append((state.global_step + 1, _Verdict(faulty)))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_log or control.should_evaluate:
            self._settle(state, control)  # a checkpoint, a logged loss or an evaluation waits for the GPU anyway
        if self.fault_step is not None:
            control.should_save = False  # the newest checkpoint stays the last good one

    def _settle(self, state, control) -> None:
        """Act on the verdicts of the steps the optimizer checked on the device."""
        pending, self._pending = self._pending, []
        for step, verdict in pending:
            if verdict.read() and self.fault_step is None:
                self._mark(step, state, control, [])

    def _mark(self, step: int, state, control, params) -> None:
        for p in params:
            p.grad = None  # the optimizer leaves a parameter without a gradient as it is
        state.log_history.append({FAULT_KEY: "skipped" if self.action == "skip_step" else "stopped", "step": step})
        if self.action == "stop":
            self.fault_step = step
            control.should_training_stop = True


def _skips_on_device(optimizer, args):
    """The torch optimizer that can skip a step from a flag on the device (fused Adam/AdamW read
    `found_inf`), when nothing else sets that flag (a grad scaler, under fp16) and one process trains."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
    if (isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and inner.defaults.get("fused")
            and not args.fp16 and distributed.world_size() == 1):
        return inner
    return None


class _Verdict:
    """A flag computed on the device, copied to host memory without waiting for it."""

    def __init__(self, flag: torch.Tensor):
        self.ready = None
        if flag.is_cuda:
            self.host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = flag

    def read(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this copy only, not for the steps queued after it
        return bool(self.host)
