"""Model structures by name: each owns its Pyro ``model`` and ``guide`` (see ``base.Structure``).

=================  =====================================================  =====================
spec               model / guide                                          reference
=================  =====================================================  =====================
``vae``            z ~ p(z), x ~ p(x|z) / z ~ q(z|x)                      Kingma & Welling 2014
``m2``             y ~ Cat(1/C), z ~ N(0, I), x ~ p(x|y, z), y observed   Kingma et al. 2014 (M2)
                   where labelled / y ~ q(y|x) enumerated, z ~ q(z|x, y)
=================  =====================================================  =====================

A new structure is one class registered here (``@STRUCTURES.register("name")``) plus its tests;
``docs/architecture.md`` has the recipe.
"""

from __future__ import annotations

from pyro_vae.registry import Registry
from pyro_vae.structures.base import Structure
from pyro_vae.structures.m2 import M2
from pyro_vae.structures.vae import PlainVAE

STRUCTURES: Registry[Structure] = Registry("structure")
# What the VAE facade passes every structure (each takes the ones it needs); a spec never sets them.
CONTEXT = ("x_shape", "z_dim", "encoder", "decoder", "prior", "likelihood", "guide", "init")
STRUCTURES.register("vae")(PlainVAE)
STRUCTURES.register("m2")(M2)

__all__ = ["CONTEXT", "M2", "STRUCTURES", "PlainVAE", "Structure"]
