"""Spec strings: ``name`` or ``name(key=value, ...)`` with Python literal values.

A spec names one entry of a registry (a prior, a likelihood, a guide, an estimator) and its
keyword arguments. The same spec can be written three ways, all equivalent:

- ``"vamp(components=500)"`` (a string, e.g. on the command line with ``--set``),
- ``{"name": "vamp", "components": 500}`` (a TOML inline table),
- ``("vamp", {"components": 500})`` (a parsed spec).
"""

from __future__ import annotations

import ast
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from keyword import iskeyword
from typing import Any

Spec = str | Mapping[str, Any] | tuple[str, Mapping[str, Any]]


class SpecError(ValueError):
    """A spec string that does not parse, or names something that does not exist."""


def closest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest valid name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def unknown_name(what: str, name: str, valid: Iterable[str], where: str = "") -> str:
    """The one wording of "not a valid name" for registries and config keys alike:
    ``unknown prior 'vmap' (did you mean "vamp"?); valid priors: normal, vamp, ...``."""
    valid = list(valid)
    return f"unknown {what} {name!r}{where}{closest(name, valid)}; valid {what}s: {', '.join(valid)}"


def parse_spec(spec: Spec) -> tuple[str, dict[str, Any]]:
    """Parse a spec into ``(name, kwargs)``.

    >>> parse_spec("iwae(k=50)")
    ('iwae', {'k': 50})
    >>> parse_spec({"name": "mixture", "components": 10})
    ('mixture', {'components': 10})
    """
    if isinstance(spec, tuple):
        name, kwargs = spec
        return str(name), dict(kwargs)
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise SpecError(f"a spec table needs a 'name' key, got keys {sorted(kwargs)}")
        return str(kwargs.pop("name")), kwargs
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string or a table, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    if not text:
        raise SpecError("empty spec")
    head, paren, rest = text.partition("(")
    if ("-" in head or iskeyword(head.strip())) and re.fullmatch(r"[A-Za-z_][\w-]*", head.strip()):
        # Hyphenated names (data variants such as "mnist-dynamic") and keywords (the NLL method "is") are not
        # Python names: parse the arguments alone.
        try:
            return head.strip(), parse_spec(f"_{paren}{rest}")[1]
        except SpecError as err:
            raise SpecError(f"in spec {spec!r}: {err}") from None
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError) as err:  # the last two: nesting deeper than the parser goes
        raise SpecError(f"cannot parse spec {spec!r}: expected name or name(key=value, ...)") from err
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
        raise SpecError(
            f"cannot parse spec {spec!r}: expected name or name(key=value, ...) with keyword arguments only"
        )
    kwargs: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise SpecError(f"cannot parse spec {spec!r}: '**' is not allowed")
        if keyword.arg in kwargs:  # Python's parser lets f(a=1, a=2) through; silently keeping the last hides a typo
            raise SpecError(f"in spec {spec!r}, argument {keyword.arg!r} is given twice")
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as err:
            raise SpecError(
                f"in spec {spec!r}, the value of {keyword.arg!r} is not a Python literal "
                "(numbers, strings in quotes, True/False/None, tuples and lists)"
            ) from err
    return node.func.id, kwargs


def format_spec(name: str, kwargs: Mapping[str, Any]) -> str:
    """Inverse of :func:`parse_spec` for strings: ``format_spec("iwae", {"k": 5}) == "iwae(k=5)"``."""
    if not kwargs:
        return name
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def split_specs(text: str) -> list[str]:
    """Split ``"trace,iwae(k=5),renyi(alpha=0.5, k=5)"`` at the commas outside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        depth += char == "("
        depth -= char == ")"
        current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


# -- argument values ---------------------------------------------------------------------------------
# The one check of each kind of spec argument value, shared by every family (priors, guides,
# likelihoods, networks, optimizers, schedules) so that they refuse the same inputs with the same
# words. Each raises ValueError naming the argument and what is valid; Registry.build turns that
# into one SpecError line naming the spec.


def integer_arg(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: an int, or an integral finite float (``10.0``); never a bool.

    Without this, ``int(1e400)`` is an OverflowError traceback, ``int(1.5)`` silently rounds and
    ``True`` passes as 1.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value) and value.is_integer()
    if not ok or value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def number_arg(
    name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, open_low: bool = False, open_high=False
) -> float:
    """``value`` as a finite float in the range ``low .. high`` (each end open or closed); never a bool."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if high == math.inf:
            valid = f"{'>' if open_low else '>='} {low:g}"
        else:
            valid = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number {valid}, got {value!r}")
    return float(value)


def flag_arg(name: str, value: Any, optional: bool = False) -> bool | None:
    """``value`` if it is True or False (or None when ``optional``): ``5`` is not a yes."""
    if isinstance(value, bool) or (optional and value is None):
        return value
    raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")


def widths_arg(name: str, value: Any) -> list[int]:
    """A list (or tuple) of positive integer layer widths, e.g. ``[200, 200]``; ``[]`` is allowed."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of positive integer widths, e.g. [200, 200], got {value!r}")
    return [integer_arg(f"{name}[{i}]", v) for i, v in enumerate(value)]
