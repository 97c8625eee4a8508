"""The VAE users build: ``VAE(...)``, a ``torch.nn.Module`` with the Pyro methods ``model`` and ``guide``.

The programs themselves belong to a model structure chosen by name (``structure="vae"``, the
default; ``pyro_vae.structures``); the networks are chosen by name too (``encoder=``,
``decoder=``; ``pyro_vae.networks``), and prior, likelihood and guide by family spec.
``hidden_dims``/``activation`` remain the shorthand for an MLP encoder with the mirrored MLP decoder.

The facade adopts the structure's child modules as its own (``vae.encoder``, ``vae.decoder``,
``vae.prior``, ``vae.likelihood`` for the plain VAE), so ``pyro.module`` names, state-dict keys
and optimizers see one module tree; any other attribute (``vae.posterior``, ``vae.z_dim``,
``vae.latent_sites``) is the structure's. Checkpoints written before the networks became
body + head (one ``nn.Sequential`` per MLP) load unchanged: :func:`_convert_legacy_keys` renames
their keys on ``load_state_dict``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from pyro_vae.networks import mlp_spec
from pyro_vae.structures import STRUCTURES
from pyro_vae.structures.base import MEAN_SAMPLES, beta_tensor, is_unit_beta, module_registration, posterior_mean

__all__ = ["MEAN_SAMPLES", "VAE", "beta_tensor", "is_unit_beta", "module_registration", "posterior_mean"]


class VAE(nn.Module):
    """Variational autoencoder with Pyro ``model`` and ``guide``.

    Args:
        x_dim: size of a flattened observation (784 for MNIST).
        z_dim: size of the latent code.
        hidden_dims: hidden widths of the MLP encoder; the decoder mirrors them. The shorthand for
            ``encoder=mlp(hidden=hidden_dims, activation=activation)`` and the mirrored decoder;
            ``(400,)`` is Pyro's tutorial net, ``(200, 200)`` the IWAE paper's, ``()`` one linear layer
            each way (the linear-Gaussian model of the exact checks).
        activation: nonlinearity between layers of the shorthand MLPs (``"softplus"``, ``"tanh"``, ...).
        prior, likelihood, guide: specs (``"vamp(components=500)"``, a TOML-style table) or
            already built modules.
        init: initialization of the encoder's and decoder's linear layers, a name from
            ``networks.INITIALIZERS``: ``"torch"`` (PyTorch's default, as in Pyro's tutorial),
            ``"glorot"`` or ``"he"``. Pyro's flow layers and the prior keep their own.
        encoder, decoder: network specs of the bodies (``"mlp(hidden=[400], activation='tanh')"``);
            ``None`` takes the shorthand.
        structure: the model structure, a spec from ``pyro_vae.structures.STRUCTURES`` (``"vae"``).
        x_shape: the event shape of one observation (default ``(x_dim,)``); the encoder body receives
            data in this shape.

    The module's device decides where everything runs: ``vae.to("cuda")`` and feed CUDA tensors.
    """

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 10,
        hidden_dims: Sequence[int] = (400,),
        activation: str = "softplus",
        prior="normal",
        likelihood="bernoulli",
        guide="normal",
        init: str = "torch",
        *,
        encoder=None,
        decoder=None,
        structure="vae",
        x_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        x_shape = (x_dim,) if x_shape is None else tuple(int(d) for d in x_shape)
        if math.prod(x_shape) != x_dim:
            raise ValueError(f"x_shape {x_shape} holds {math.prod(x_shape)} values, but x_dim is {x_dim}")
        self.hidden_dims, self.activation = tuple(hidden_dims), activation
        built = STRUCTURES.build(
            structure,
            x_shape=x_shape,
            z_dim=z_dim,
            encoder=encoder if encoder is not None else mlp_spec(hidden_dims, activation),
            decoder=decoder if decoder is not None else mlp_spec(tuple(reversed(hidden_dims)), activation),
            prior=prior,
            likelihood=likelihood,
            guide=guide,
            init=init,
        )
        self._adopt(built)
        self._register_load_state_dict_pre_hook(_convert_legacy_keys)

    def _adopt(self, structure: nn.Module) -> None:
        """Make the structure's child modules this module's own, and keep the structure unregistered:
        one module tree (stable state-dict keys), whatever the structure."""
        loose = [name for name, _ in structure.named_parameters(recurse=False)]
        loose += [name for name, _ in structure.named_buffers(recurse=False)]
        if loose:  # they would be invisible to state_dict, .to() and the optimizer
            raise ValueError(
                f"structure {type(structure).__name__} must keep its parameters and buffers in child modules "
                f"(the VAE adopts its children); found {', '.join(loose)}"
            )
        for name, child in structure.named_children():
            self.add_module(name, child)
        self.__dict__["structure"] = structure

    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        """The structure's generative model p(x, z) as a Pyro program over a batch."""
        return self.structure.model(x, beta, **data)

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        """The structure's guide q(z|x) as a Pyro program over a batch."""
        return self.structure.guide(x, beta, **data)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, child modules
        except AttributeError:
            structure = self.__dict__.get("structure")
            if structure is None:
                raise
            return getattr(structure, name)


# An MLP written as one nn.Sequential (Linear, activation, ..., Linear): its last Linear is now the head.
_LEGACY_KEY = re.compile(r"^(encoder\.net\.net|decoder\.net)\.(\d+)\.(weight|bias)$")


def _convert_legacy_keys(state_dict, prefix: str, *args) -> None:
    """Rename the keys of a checkpoint written before the body + head split, in place.

    Old: ``encoder.net.net.{i}`` and ``decoder.net.{i}`` (one ``nn.Sequential`` of Linear and
    activation layers). New: ``...body.layers.{i}`` for every Linear but the last, which is ``...head``.
    """
    found = {}
    for key in list(state_dict):
        match = _LEGACY_KEY.match(key[len(prefix) :]) if key.startswith(prefix) else None
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    for net, indices in found.items():
        last = max(indices)
        new_net = "encoder.net" if net.startswith("encoder") else "decoder"
        for index in indices:
            for kind in ("weight", "bias"):
                old = f"{prefix}{net}.{index}.{kind}"
                if old in state_dict:
                    place = "head" if index == last else f"body.layers.{index}"
                    state_dict[f"{prefix}{new_net}.{place}.{kind}"] = state_dict.pop(old)
