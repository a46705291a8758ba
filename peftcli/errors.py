"""The two ways a command fails: the user's mistake (exit 2) or the run's (exit 1).

Builders raise these with everything a person needs to fix the problem; the CLI renders
them as one message, never a traceback (unless --debug)."""


class UserError(Exception):
    """A mistake in a recipe, a data file or the command line: exit 2.

    `where` names the file, field, line or row; `hint` says what would fix it."""

    exit_code = 2
    label = "error"  # how the CLI introduces the message

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.where, self.hint = message, where, hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class RunFailure(UserError):
    """Training or I/O failed for a reason outside the recipe (out of memory, disk full...): exit 1."""

    exit_code = 1


class Interrupted(UserError):
    """The run was stopped by a signal after saving a checkpoint: exit 128 + the signal's number
    (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended."""

    label = "interrupted"

    def __init__(self, message: str, *, signal_number: int, where: str | None = None, hint: str | None = None):
        super().__init__(message, where=where, hint=hint)
        self.exit_code = 128 + signal_number
