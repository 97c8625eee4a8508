"""Model structures by name: each owns its Pyro ``model`` and ``guide`` (see ``base.Structure``).

=================  =====================================================  =====================
spec               model / guide                                          reference
=================  =====================================================  =====================
``vae``            z ~ p(z), x ~ p(x|z) / z ~ q(z|x)                      Kingma & Welling 2014
``two_layer(...)`` z2 ~ p(z2), z1 ~ p(z1|z2), x ~ p(x|z1) /                Burda et al. 2015, sec. 5
                   z1 ~ q(z1|x), z2 ~ q(z2|z1)
``cvae``           z ~ p(z|x_in), y ~ p(y|z) / z ~ q(z|x_in, y)           Sohn, Lee & Yan 2015
``cvae_baseline``  y ~ p(y|x_in) / (no latent)                          Sohn, Lee & Yan 2015
``m2``             y ~ Cat(1/C), z ~ N(0, I), x ~ p(x|y, z), y observed   Kingma et al. 2014 (M2)
                   where labelled / y ~ q(y|x) enumerated, z ~ q(z|x, y)
``miwae``          z ~ p(z), x_obs ~ p(x_obs|z) / z ~ q(z|x_obs, m)       Mattei & Frellsen 2019
                   (m: the observed pixels, ``data.missing``)
=================  =====================================================  =====================

A new structure is one class registered here (``@STRUCTURES.register("name")``) plus its tests;
``docs/architecture.md`` has the recipe.
"""

from __future__ import annotations

from pyro_vae.registry import Registry
from pyro_vae.structures.base import Structure
from pyro_vae.structures.cvae import CVAE, Baseline
from pyro_vae.structures.m2 import M2
from pyro_vae.structures.miwae import MIWAE
from pyro_vae.structures.two_layer import TwoLayerVAE
from pyro_vae.structures.vae import PlainVAE

STRUCTURES: Registry[Structure] = Registry("structure")
# What the VAE facade passes every structure (each takes the ones it needs); a spec never sets them.
CONTEXT = ("x_shape", "z_dim", "encoder", "decoder", "prior", "likelihood", "guide", "init")
STRUCTURES.register("vae")(PlainVAE)
STRUCTURES.register("two_layer")(TwoLayerVAE)
STRUCTURES.register("cvae")(CVAE)
STRUCTURES.register("cvae_baseline")(Baseline)
STRUCTURES.register("m2")(M2)
STRUCTURES.register("miwae")(MIWAE)

__all__ = ["CONTEXT", "CVAE", "M2", "MIWAE", "STRUCTURES", "Baseline", "PlainVAE", "Structure", "TwoLayerVAE"]
