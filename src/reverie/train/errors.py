"""The training layer's errors: a run that cannot go on, with a message that says why."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says why."""


class RunInUse(TrainingError):
    """Another process is training in this run directory."""


class RunChanged(TrainingError):
    """A resume whose config changes the network the run was trained with."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped a run after a completed step, with a checkpoint written there: running
    the same command again resumes it exactly. A ``KeyboardInterrupt``, so ``except Exception`` does not swallow
    it; ``step``, ``checkpoint`` and ``signum`` say where it stopped and why."""

    def __init__(self, message: str, step: int, checkpoint, signum: int):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
