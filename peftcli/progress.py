"""Live training progress with rich: step, loss, tokens/s and time left, in one line; and the count
of tokens trained on, kept without making the host wait for the GPU."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from peftcli import distributed


class RichProgress(TrainerCallback):
    """Replaces the Trainer's tqdm bar and log printer; prints each evaluation as a line."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="–", speed="–")
        self.started, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        elapsed = time.perf_counter() - self.started  # TokensSeen has counted up to this step
        speed = (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.task, speed=f"{speed:,.0f}")
        if "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")
        if "eval_loss" in logs:
            self.progress.console.print(f"  step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TokensSeen(TrainerCallback):
    """Counts the non-padding tokens of every training forward into `state.num_input_tokens_seen`.

    The Trainer's own count (`include_num_input_tokens_seen`) reads each batch's count from the GPU,
    a wait per micro-batch after which the GPU idles while the host prepares the next step. Here the
    count adds up on the device and is read when a step logs, saves, evaluates or ends training
    (which wait for the GPU anyway), so a checkpoint holds it; added after any callback that asks
    for a save (train.watch)."""

    def __init__(self):
        self.counted: torch.Tensor | None = None
        self.at_start = 0  # the count a resumed run starts from (its checkpoint's)
        self.this_run = 0  # tokens counted by this run, over every process
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.counted, self.at_start, self.this_run = None, state.num_input_tokens_seen, 0
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        tokens = mask.sum() if mask is not None else torch.tensor(ids.numel() if ids is not None else 0)
        self.counted = tokens if self.counted is None else self.counted + tokens.to(self.counted.device)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self._publish(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._publish(args, state)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _publish(self, args, state) -> None:
        """Every process publishes at the same steps: the count is summed over them."""
        self.this_run = distributed.total(0 if self.counted is None else int(self.counted), args.device)
        state.num_input_tokens_seen = self.at_start + self.this_run
