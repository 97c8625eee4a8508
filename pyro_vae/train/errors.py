"""The errors training raises; ``pyro-vae train`` prints them as one line, without a traceback."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run folder in the wrong state)."""


class NonFiniteLossError(TrainingError):
    """A step's loss was NaN or infinite; the message names the epoch and step."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


class DivergenceError(TrainingError):
    """An epoch left non-finite weights, optimizer state or numbers, or its train ELBO fell too far.

    Raised before the epoch writes anything: the message says which epoch ``checkpoint.pt`` and
    ``best.pt`` still hold and how to resume from there with a smaller learning rate.
    """

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


class RunFolderLockedError(TrainingError):
    """Another process is writing into the run folder (it holds the folder's ``.lock``)."""
