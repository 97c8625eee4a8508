"""The semi-supervised M2 of Kingma, Rezende, Mohamed & Welling (2014), "Semi-Supervised Learning with
Deep Generative Models" (NeurIPS), with the class label summed out by enumeration (Pyro's
``examples/vae/ss_vae_M2.py``).

Generative model and guide, over one data plate::

    p(y) = Cat(1/C),   p(z) = N(0, I),   p(x|y, z) = likelihood(decoder([z, onehot(y)]))
    q(y|x) = Cat(softmax(classifier(x))),   q(z|x, y) = guide(encoder([x, onehot(y)]))

Labels arrive in the data field ``labels`` (``pyro_vae.fields``; -1 where hidden). The model
observes y where it is known through Pyro's partial observation,
``pyro.sample("y", p(y), obs=labels, obs_mask=labels >= 0)``, which makes the sites
``"y_observed"`` (labelled rows), ``"y_unobserved"`` (the others) and a deterministic ``"y"``. The
guide draws ``"y_unobserved"`` from q(y|x) on the unlabelled rows (``poutine.mask``) with
``infer={"enumerate": "parallel"}``, so ``TraceEnum_ELBO`` (estimator ``enum``) sums it out
exactly. Per example this is Kingma et al.'s eq. 6 on labelled rows and eq. 7 on the others:

    -L(x, y) = E_q(z|x,y)[log p(x|y, z) + log p(y) + log p(z) - log q(z|x, y)]
    -U(x)    = sum_y q(y|x) (-L(x, y)) + H(q(y|x))

and the auxiliary classification term of eq. 9, alpha * log q(y|x) on each labelled row, is a
``pyro.factor("y_aux", ...)`` in the model, so every estimator trains J^alpha. A training ELBO
(``train_elbo`` in ``metrics.jsonl``) therefore includes that term; validation and test sets have
no observed labels, so their bounds are bounds on log p(x) alone.

**alpha** is the weight per labelled example each time it is seen (Pyro's ``aux_loss_multiplier``).
Kingma et al. weight E_{labelled}[log q(y|x)] by alpha = 0.1 N, i.e. 0.1 N / N_l per labelled
example: 50 for N = 50 000 images and N_l = 100 labels. Pyro's example chose 46 on validation
accuracy (its tutorial's Table 1: 93.2% test accuracy with 100 labels). The default is Pyro's 46,
within 10% of Kingma's at 100 labels; with more labels Kingma's rule gives less (1.7 at 3000).

**beta** (KL warm-up, ``kl_scale``) scales the site ``"z"`` only: y's KL to its uniform prior keeps
the entropy of q(y|x), which stops the classifier from becoming confident before it has learnt
anything. M2 is usually trained without warm-up (``needs_warmup`` is empty).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_vae.fields import HIDDEN
from pyro_vae.guides import build_guide
from pyro_vae.likelihoods import build_likelihood
from pyro_vae.networks import build_network, initialize
from pyro_vae.priors import build_prior
from pyro_vae.structures.base import Structure, data_plate, kl_scale, likelihood_decoder, register, require_family

# Pyro's aux_loss_multiplier (examples/vae/ss_vae_M2.py): the weight of log q(y|x) per labelled example.
PYRO_ALPHA = 46.0


def joined(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dimension after broadcasting the others.

    x has shape ``(batch, D)`` while an enumerated y has ``(C, 1, ..., batch)`` (enumeration and
    particle dimensions left of the data plate, wherever the caller put them): each part is
    expanded to the common leading shape, so no absolute dimension is assumed.
    """
    leading = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*leading, p.shape[-1]) for p in parts], dim=-1)


class M2(Structure):
    """p(y) p(z) p(x|y, z) with q(y|x) q(z|x, y); the structure ``"m2"`` (see the module docstring).

    Args:
        x_shape, z_dim, encoder, decoder, likelihood, guide, init: as for the plain VAE; the
            encoder body reads ``[x, onehot(y)]`` (flat), the decoder body ``[z, onehot(y)]``.
        prior: must be ``"normal"`` (M2's p(z) = N(0, I)).
        classes: the number of classes C.
        alpha: weight of the auxiliary term alpha * log q(y|x) per labelled example (Kingma et al.,
            eq. 9); 0 drops it.
        classifier: network spec of q(y|x)'s body (``"mlp(hidden=[500])"``); ``None`` takes the
            encoder's spec. A linear head gives the C logits.
    """

    latent_sites = ("y_unobserved", "z")
    observed_sites = ("y_observed", "x")
    consumes = ("labels",)

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        encoder,
        decoder,
        prior="normal",
        likelihood="bernoulli",
        guide="normal",
        init: str = "torch",
        classes: int = 10,
        alpha: float = PYRO_ALPHA,
        classifier=None,
    ) -> None:
        super().__init__()
        if not (isinstance(classes, int) and classes >= 2):
            raise ValueError(f"m2: classes must be an integer >= 2, got {classes!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
            raise ValueError(f"m2: alpha must be a finite number >= 0, got {alpha!r}")
        self.x_shape = tuple(int(d) for d in x_shape)
        self.x_dim, self.z_dim, self.classes, self.alpha = math.prod(self.x_shape), z_dim, classes, float(alpha)
        require_family("m2", "prior", prior, "normal", "has p(z) = N(0, I)")
        self.prior = build_prior(prior, z_dim=z_dim, x_shape=self.x_shape)
        self.likelihood = build_likelihood(likelihood, x_dim=self.x_dim)
        self.encoder = build_guide(guide, body=build_network(encoder, (self.x_dim + classes,)), z_dim=z_dim)
        self.decoder = likelihood_decoder(decoder, self.likelihood, (z_dim + classes,), self.x_shape)
        body = build_network(encoder if classifier is None else classifier, self.x_shape)
        self.classifier = nn.Sequential(body, nn.Linear(body.out_features, classes))
        initialize((getattr(self.encoder, "net", self.encoder), self.decoder, self.classifier), init)

    # -- Pyro programs ------------------------------------------------------------------
    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, labels: torch.Tensor | None = None):
        """p(y) p(z) p(x|y, z), y observed where ``labels >= 0``; plus alpha * log q(y|x) on labelled rows."""
        for name in ("decoder", "likelihood", "prior", "classifier"):
            register(name, getattr(self, name))
        x = x.reshape(x.shape[0], -1)
        known = self._known(x, labels)
        with data_plate(x):
            y = pyro.sample("y", self.label_prior(x), obs=known.clamp(min=0), obs_mask=known >= 0)
            with kl_scale(beta):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decode(z, y), obs=self.likelihood.prepare(x))
            if self.alpha and labels is not None:  # Kingma et al. eq. 9; nothing where no label is seen
                with poutine.mask(mask=known >= 0):
                    pyro.factor("y_aux", self.alpha * self.classify(x).log_prob(known.clamp(min=0)))
        return z

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, labels: torch.Tensor | None = None):
        """q(y|x) on the unlabelled rows (enumerated), then q(z|x, y) with y the label where it is known."""
        register("classifier", self.classifier)
        register("encoder", self.encoder)
        x = x.reshape(x.shape[0], -1)
        known = self._known(x, labels)
        with data_plate(x):
            with poutine.mask(mask=known < 0):
                guessed = pyro.sample("y_unobserved", self.guess(x, known), infer={"enumerate": "parallel"})
            y = torch.where(known >= 0, known, guessed)
            with kl_scale(beta):
                return pyro.sample("z", self.encoder(joined(x, self.onehot(y, x))))

    def check_data(self, x: torch.Tensor, name: str) -> None:
        """The likelihood's check (labels are checked by ``pyro_vae.fields`` when the data set is made)."""
        self.likelihood.check(x, name=name)

    def metrics(self, x: torch.Tensor, true_labels: torch.Tensor | None, **data) -> dict[str, torch.Tensor]:
        """``accuracy``: 1 where argmax_y q(y|x) is the true label, else 0 (none without true labels).

        The true labels come positionally (``Structure.metrics``); ``data`` holds the consumed field
        ``labels`` (the observed ones, all hidden outside training), hence the other name here.
        """
        if true_labels is None:
            return {}
        predicted = self.classify(x.reshape(x.shape[0], -1)).logits.argmax(-1)
        return {"accuracy": (predicted == true_labels).to(x.dtype)}

    def figures(self, dataset) -> dict[str, Callable[[Path], Path]]:
        """``class_samples.png`` (rows: y, columns: one z each) and ``style_transfer.png``."""
        from pyro_vae.plots import m2_figures  # matplotlib loads only when figures are drawn

        return m2_figures(self, dataset)

    # -- plain-torch pieces -----------------------------------------------------------------
    def _known(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The observed labels, -1 where hidden; every row hidden when none are passed."""
        if labels is None:
            return torch.full((x.shape[0],), HIDDEN, dtype=torch.long, device=x.device)
        return labels.to(device=x.device, dtype=torch.long)

    def onehot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """onehot(y) in ``like``'s dtype, shape ``(*y.shape, C)``."""
        return F.one_hot(y, self.classes).to(like.dtype)

    def label_prior(self, like: torch.Tensor) -> dist.Categorical:
        """p(y) = Cat(1/C)."""
        return dist.Categorical(logits=like.new_zeros(self.classes))

    def classify(self, x: torch.Tensor) -> dist.Categorical:
        """q(y|x) for flat rows ``(batch, x_dim)``."""
        return dist.Categorical(logits=self.classifier(x.reshape(x.shape[0], *self.x_shape)))

    def guess(self, x: torch.Tensor, known: torch.Tensor) -> dist.Categorical:
        """The guide's distribution of ``"y_unobserved"``: q(y|x) on unlabelled rows, uniform on labelled ones.

        On a labelled row the site is masked out and its C enumerated copies all carry the observed
        label, each with its own draw of z. ``TraceEnum_ELBO`` still averages those copies with the
        site's probabilities: with q(y|x) there, the classifier would get a gradient from labelled
        rows that is zero only in expectation (pure noise). Uniform weights make the labelled bound
        the plain mean over the copies, as ``pyro_vae.traces`` computes it, with no such gradient.
        """
        logits = self.classifier(x.reshape(x.shape[0], *self.x_shape))
        return dist.Categorical(logits=torch.where((known >= 0).unsqueeze(-1), torch.zeros_like(logits), logits))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x|y, z), broadcasting y (possibly enumerated) against z."""
        return self.likelihood(self.decoder(joined(z, self.onehot(y, z))))

    @torch.no_grad()
    def conditional_mean(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E[x|y, z] in data units, shape ``(*broadcast(y, z), x_dim)``."""
        return self.likelihood.mean(self.decoder(joined(z, self.onehot(y, z))))

    @torch.no_grad()
    def style(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, z): the classifier's label argmax q(y|x) and the mean of q(z|x, y) at it, for flat rows."""
        x = x.reshape(x.shape[0], -1)
        y = self.classify(x).logits.argmax(-1)
        return y, self.encoder.gaussian_params(joined(x, self.onehot(y, x)))[0]
