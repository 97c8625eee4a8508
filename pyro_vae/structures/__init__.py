"""Model structures by name: each owns its Pyro ``model`` and ``guide`` (see ``base.Structure``).

=================  =====================================================  =====================
spec               model / guide                                          reference
=================  =====================================================  =====================
``vae``            z ~ p(z), x ~ p(x|z) / z ~ q(z|x)                      Kingma & Welling 2014
=================  =====================================================  =====================

A new structure is one class registered here (``@STRUCTURES.register("name")``) plus its tests;
``docs/architecture.md`` has the recipe.
"""

from __future__ import annotations

from pyro_vae.registry import Registry
from pyro_vae.structures.base import Structure
from pyro_vae.structures.vae import PlainVAE

STRUCTURES: Registry[Structure] = Registry("structure")
STRUCTURES.register("vae")(PlainVAE)

__all__ = ["STRUCTURES", "PlainVAE", "Structure"]
