"""The training layer's errors: a run that cannot go on, with a message that says why."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says why."""


class RunInUse(TrainingError):
    """Another process is training in this run directory."""


class RunChanged(TrainingError):
    """A resume whose config changes the network the run was trained with."""
