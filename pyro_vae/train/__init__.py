"""Training: :func:`train` writes a run folder; the pieces it is made of live in the modules here.

See ``docs/architecture.md`` ("The training wing") for what each module does.
"""

from pyro_vae.train.loop import NonFiniteLossError, TrainingError, evaluate_elbo, fit, train, warmup_beta

__all__ = ["NonFiniteLossError", "TrainingError", "evaluate_elbo", "fit", "train", "warmup_beta"]
