"""The errors training raises; ``pyro-vae train`` prints them as one line, without a traceback."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run folder in the wrong state)."""


class NonFiniteLossError(TrainingError):
    """A step's loss was NaN or infinite; the message names the epoch and step."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step
