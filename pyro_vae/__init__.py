"""pyro_vae: variational autoencoders on Pyro and PyTorch, checked against closed forms."""

from pyro_vae.ais import ais_log_likelihood, bdmc  # also registers the NLL method "ais" in evaluate.NLL_METHODS
from pyro_vae.closed_form import closed_form_elbo, closed_form_terms
from pyro_vae.evaluate import log_likelihood
from pyro_vae.model import VAE

__all__ = ["VAE", "ais_log_likelihood", "bdmc", "closed_form_elbo", "closed_form_terms", "log_likelihood"]
__version__ = "0.1.0"
