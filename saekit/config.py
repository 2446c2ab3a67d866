"""Type checks for settings read from files (`--config`, a run's saved config.json).

A TOML/YAML/JSON value of the wrong type would otherwise pass silently (`normalize = "no"` is
truthy) or fail far away with a traceback (`k = [1, 2]`). `check_types` compares each value with
the field's annotation and names the key, the expected type and the value in one line.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from saekit.errors import SaekitError


def check_types(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` (field name -> value) checked against `cls`'s annotations; returns it with whole
    floats made ints and ints made floats where the field says so. Keys that are not fields are
    left to the caller (it knows which names to suggest)."""
    hints = typing.get_type_hints(cls)  # the annotations are strings (postponed evaluation)
    checked = {}
    for key, value in data.items():
        if key not in hints:
            checked[key] = value
            continue
        ok, converted = _convert(value, hints[key])
        if not ok:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise SaekitError(f"{source}: {key.replace('_', '-')} must be {_describe(hints[key])}, got {shown}")
        checked[key] = converted
    return checked


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    """(value matches tp, value in tp's type)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _convert(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            return False, value
        done = [_convert(v, item) for v in value]
        return all(ok for ok, _ in done), [v for _, v in done]
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if isinstance(value, bool):  # bool is an int subclass: only a bool field takes it
        return tp is bool, value
    if tp is int and isinstance(value, float):
        return value.is_integer(), int(value) if value.is_integer() else value  # JSON writes 1e6 as a float
    if tp is float and isinstance(value, int):
        return True, float(value)
    return isinstance(value, tp), value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table", type(None): "null"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_PLURALS.get(item, 'values')}"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))
