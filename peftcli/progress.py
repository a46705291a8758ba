"""Live training progress with rich: step, loss, tokens/s and time left, in one line."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback


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
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.started
        speed = (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.task, completed=state.global_step, speed=f"{speed:,.0f}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")
        if "eval_loss" in logs:
            self.progress.console.print(f"  step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
