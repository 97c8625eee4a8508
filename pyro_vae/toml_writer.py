"""A small TOML writer: the inverse of ``tomllib`` for the values a config holds.

The standard library reads TOML but does not write it, and a run folder's ``config.toml`` must
read back *exactly* (floats included), so the writer is here rather than a dependency. It knows
strings, integers, floats (``nan`` and ``inf`` too), booleans, lists and inline tables; that is
all a config holds. TOML has no null, so :func:`dumps` writes a None value as a comment and a None
nested in a list or table is an error. A leaf: it imports nothing from ``pyro_vae``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class TOMLWriteError(ValueError):
    """A value that TOML cannot hold (a None inside a table, an object of an unknown type)."""


def dumps(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """``{"section": {"key": value}}`` as TOML text, one ``[section]`` per table, in order.

    A value of None is written as a comment (``# key is not set``): TOML has no null, so the key is
    left out and reading the file back gives the reader's default for it.
    """
    lines: list[str] = []
    for section, values in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{toml_key(section)}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_key(key: str) -> str:
    """A key as written: bare when TOML allows it, else quoted."""
    return key if _BARE_KEY.match(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """One TOML value: strings, integers, floats, booleans, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest repr that reads back exactly, e.g. 0.001, 1e-05, 2.0
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; DEL must be escaped in TOML too.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise TOMLWriteError("TOML has no null: None cannot be written inside a list or table")
    raise TOMLWriteError(f"cannot write {type(value).__name__} {value!r} as TOML")
