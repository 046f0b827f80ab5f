"""The training layer's error: a run that cannot go on, with a message that says why."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses, a run owned by another process)."""
