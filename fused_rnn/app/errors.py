"""The two ways a command ends early: a user's mistake (one line, exit 1) and a stop by signal."""


class UserError(Exception):
    """A mistake in the command line, corpus or checkpoint: reported in one line, no traceback."""


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; ``status``: 128 + signal."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status
