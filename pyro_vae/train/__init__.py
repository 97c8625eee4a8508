"""Training: :func:`train` writes a run folder; the pieces it is made of live in the modules here.

``loop`` (train, preparing a run), ``epoch`` (one epoch and its sums), ``run_folder`` (the files
and the progress lines), ``step`` (one optimization step), ``recorded`` (a loss recorded once and
replayed), ``distributed`` (the context: one process or a torchrun group), ``fit`` (the minimal
SVI loop). See ``docs/architecture.md``, "The training wing".
"""

from pyro_vae.train.epoch import warmup_beta
from pyro_vae.train.errors import DivergenceError, NonFiniteLossError, RunFolderLockedError, TrainingError
from pyro_vae.train.fit import evaluate_elbo, fit
from pyro_vae.train.loop import train

__all__ = [
    "DivergenceError",
    "NonFiniteLossError",
    "RunFolderLockedError",
    "TrainingError",
    "evaluate_elbo",
    "fit",
    "train",
    "warmup_beta",
]
