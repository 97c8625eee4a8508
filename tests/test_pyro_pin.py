"""Pyro is pinned to the releases ``pyro_vae/estimators.py`` was tested with, because it relies on Pyro internals.

``estimators.py`` patches or calls private parts of Pyro:

- ``JitMeanFieldELBO`` sets ``elbo._loss_and_surrogate_loss = elbo._differentiable_loss``: Pyro 1.9's
  ``JitTraceMeanField_ELBO.differentiable_loss`` keeps its compiled loss in ``_differentiable_loss``
  but compiles anew whenever ``_loss_and_surrogate_loss`` is unset, i.e. on every call (60x slower);
- ``TraceGraphELBO`` calls ``TraceGraph_ELBO._loss_and_surrogate_loss(model, guide, args, kwargs)``
  for ``(elbo, surrogate_loss)``, since ``TraceGraph_ELBO`` has no public differentiable loss.

The tested range is the ``pyro-ppl`` requirement in ``pyproject.toml`` (the one place it is
written). These tests check the installed Pyro against it and the internals on real Pyro objects,
and fail saying what to re-check.
"""

from __future__ import annotations

import inspect
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version
from pyro.infer import JitTraceMeanField_ELBO, TraceGraph_ELBO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECHECK = (
    "pyro_vae/estimators.py relies on Pyro internals: re-check JitMeanFieldELBO (it copies "
    "JitTraceMeanField_ELBO._differentiable_loss to _loss_and_surrogate_loss so the compiled loss is reused) "
    "and TraceGraphELBO (it calls TraceGraph_ELBO._loss_and_surrogate_loss(model, guide, args, kwargs)), "
    "run tests/test_pyro_pin.py and tests/test_estimators.py, then set the pyro-ppl range in pyproject.toml."
)


def pyro_requirement() -> Requirement:
    """The ``pyro-ppl`` requirement of ``pyproject.toml``: the Pyro releases this project was tested with."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == "pyro-ppl"]
    return requirement


def model(x):
    shift = pyro.param("shift", torch.zeros(2))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.zeros(2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).expand([x.shape[0], 2]).to_event(1))


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_installed_pyro_is_in_the_tested_range():
    requirement = pyro_requirement()
    installed = Version(pyro.__version__)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"Pyro {installed} is outside the tested range pyro-ppl{requirement.specifier} (pyproject.toml). {RECHECK}"
    )


def test_the_range_has_an_upper_bound():
    # Without one, an install picks up the next Pyro release, whose internals nobody has checked.
    specifier = pyro_requirement().specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in specifier), (
        f"pyro-ppl{specifier} in pyproject.toml has no upper bound. {RECHECK}"
    )


def test_jit_meanfield_keeps_its_compiled_loss_where_estimators_reads_it():
    x = torch.randn(5, 2)
    elbo = JitTraceMeanField_ELBO(ignore_jit_warnings=True)
    elbo.differentiable_loss(model, guide, x)
    compiled = getattr(elbo, "_differentiable_loss", None)
    assert callable(compiled), f"JitTraceMeanField_ELBO no longer stores _differentiable_loss. {RECHECK}"
    # Unpatched, Pyro 1.9 compiles again on the next call: the slowness the patch exists to avoid.
    elbo.differentiable_loss(model, guide, x)
    assert elbo._differentiable_loss is not compiled, (
        "JitTraceMeanField_ELBO now reuses its compiled loss by itself: the patch in JitMeanFieldELBO may be "
        f"unneeded. {RECHECK}"
    )
    # Patched as estimators.py does, the compiled loss is reused and still differentiable.
    elbo._loss_and_surrogate_loss = compiled = elbo._differentiable_loss
    loss = elbo.differentiable_loss(model, guide, x)
    assert elbo._differentiable_loss is compiled, (
        f"JitTraceMeanField_ELBO no longer reads _loss_and_surrogate_loss before compiling. {RECHECK}"
    )
    assert loss.shape == () and loss.requires_grad


def test_tracegraph_has_the_surrogate_loss_estimators_calls():
    method = getattr(TraceGraph_ELBO, "_loss_and_surrogate_loss", None)
    assert callable(method), f"TraceGraph_ELBO._loss_and_surrogate_loss is gone. {RECHECK}"
    parameters = list(inspect.signature(method).parameters)
    assert parameters == ["self", "model", "guide", "args", "kwargs"], (
        f"TraceGraph_ELBO._loss_and_surrogate_loss now takes {parameters}. {RECHECK}"
    )
    elbo, surrogate_loss = TraceGraph_ELBO()._loss_and_surrogate_loss(model, guide, (torch.randn(5, 2),), {})
    assert elbo.shape == () and surrogate_loss.shape == () and surrogate_loss.requires_grad, (
        f"TraceGraph_ELBO._loss_and_surrogate_loss no longer returns (elbo, differentiable surrogate). {RECHECK}"
    )
