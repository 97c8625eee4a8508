"""One registry mechanism for every family chosen by name (priors, likelihoods, guides, estimators).

A registry maps a name to a factory (usually a class). ``check(spec, context)`` parses the
spec and checks its name and keyword arguments against the factory's signature, without
building anything; ``build(spec, **context)`` checks the same way, then calls the factory with the
context (e.g. ``z_dim``) plus the spec's arguments. Unknown names and unknown keys are errors
that list what is valid and suggest the closest. Config validation (``pyro_vae.checks``) calls
``check`` too, so a config and a direct ``build`` refuse a spec with the same words.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from pyro_vae.specs import Spec, SpecError, closest, format_spec, parse_spec, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """A named family of factories, e.g. ``priors = Registry("prior")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@priors.register("mixture")`` on a class or function."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            factory.spec_name = name  # type: ignore[attr-defined]
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def factory(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise SpecError(unknown_name(self.kind, name, self.names()))
        return self._entries[name]

    def user_keys(self, name: str, context: tuple[str, ...] = ()) -> list[str]:
        """The keyword arguments a spec may set for ``name`` (context arguments excluded)."""
        params = inspect.signature(self.factory(name)).parameters.values()
        return [
            p.name
            for p in params
            if p.name not in context and p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def check(self, spec: Spec, context: Iterable[str] = ()) -> tuple[str, dict[str, Any]]:
        """``(name, kwargs)`` of a spec whose name is registered and whose keyword names the factory takes.

        ``context`` names the arguments the caller passes itself (e.g. ``z_dim``); a spec may not
        set them. Raises :class:`SpecError` listing the valid names or arguments and the closest
        match. Argument *values* are left to the factory, which is the only judge of them.
        """
        name, kwargs = parse_spec(spec)
        valid = self.user_keys(name, tuple(context))
        for key in kwargs:
            if key not in valid:
                listed = ", ".join(valid) if valid else "none"
                raise SpecError(
                    f"{self.kind} {name!r} has no argument {key!r}{closest(key, valid)}; its arguments: {listed}"
                )
        return name, kwargs

    def build(self, spec: Spec | T, **context: Any) -> T:
        """Build an entry from a spec; an already built object is returned unchanged."""
        if not isinstance(spec, (str, tuple, Mapping)):
            return spec  # already built: a Python object passed in place of a spec
        name, kwargs = self.check(spec, context)  # type: ignore[arg-type]
        factory = self.factory(name)
        accepted = inspect.signature(factory).parameters
        ctx = {k: v for k, v in context.items() if k in accepted}
        try:
            obj = factory(**ctx, **kwargs)
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: a huge number a factory did not vet
            raise SpecError(f"bad {self.kind} {format_spec(name, kwargs)}: {err}") from err
        with contextlib.suppress(AttributeError):  # objects without a __dict__ keep no record of their spec
            obj.spec = format_spec(name, kwargs)  # type: ignore[attr-defined]
        return obj
