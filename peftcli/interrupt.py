"""Ctrl-C and SIGTERM during training: save a checkpoint at the next step boundary, then stop.

The first signal only asks: the Trainer finishes the step it is in, saves a checkpoint and
stops; the run writes its report marked `interrupted` and exits 128 + the signal number
(130 for SIGINT, 143 for SIGTERM). The handlers are then back to Python's defaults, so a
second signal acts at once (KeyboardInterrupt, or death by SIGTERM); checkpoints are
published by rename (peftcli.checkpoints), so the newest complete one survives whatever is
cut short. Under several processes they agree at each step boundary, so that all stop at
the same step.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from transformers import TrainerCallback

from peftcli import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """Turns the first SIGINT/SIGTERM into "save at the next step boundary and stop"."""

    def __init__(self, console=None):
        self.console = console  # None: say nothing (the processes other than rank 0)
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict = {}

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    @contextmanager
    def installed(self):
        """Handle the signals while the block runs (signals reach only the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {number: signal.getsignal(number) for number in SIGNALS}
        for number in SIGNALS:
            signal.signal(number, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def _handle(self, number, frame):
        self.received = number
        self._restore()  # a second signal acts at once
        key = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
        if self.console is not None:
            self.console.print(f"[yellow]{key}: saving a checkpoint after this step, then stopping "
                               f"({key} again stops at once)[/]")

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.received = distributed.agreed_max(self.received or 0, args.device) or None
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
