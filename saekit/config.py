"""Settings: the one reader of config files, their type checks, and the value checks every config shares.

Each stage's config is a dataclass with a docstring under every field; the CLI makes one flag per
field. A field's metadata may carry what the CLI needs: `flag` (a flag name other than the field's,
e.g. `--hook` for the list field `hooks`) and `argument` (a positional argument, e.g. STORE).

`read_config_file` reads a `--config` file (TOML, YAML or JSON), and `check_dict` checks its keys
against the fields. A TOML/YAML/JSON value of the wrong type would otherwise pass silently
(`normalize = "no"` is truthy) or fail far away with a traceback (`k = [1, 2]`). `check_types`
compares each value with the field's annotation and names the key, the expected type and the value
in one line.

`need`, `check_positive`, `check_non_negative`, `check_fraction` and `check_k` are the one place
each such check is written, so a bad value reads the same in every command.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from saekit.errors import SaekitError, one_line

# --------------------------------------------------------------------------------------------
# Value checks shared by the configs (each names the flag, so the CLI user knows what to fix)
# --------------------------------------------------------------------------------------------


def need(ok: bool, message: str) -> None:
    """Raise `message` as a one-line SaekitError unless `ok`."""
    if not ok:
        raise SaekitError(message)


def check_finite(flag: str, value: float) -> None:
    """Every numeric check starts here: inf and NaN are never a setting."""
    need(math.isfinite(value), f"{flag} {value} must be a finite number")


def check_positive(flag: str, value: float) -> None:
    check_finite(flag, value)
    need(value > 0, f"{flag} {value} must be positive")


def check_non_negative(flag: str, value: float, zero: str) -> None:
    """value >= 0, where 0 means `zero` (e.g. 'auto')."""
    check_finite(flag, value)
    need(value >= 0, f"{flag} {value} must be >= 0 (0: {zero})")


def check_fraction(flag: str, value: float) -> None:
    check_finite(flag, value)
    need(0 <= value <= 1, f"{flag} {value} must be in [0, 1]")


def check_k(k: float, n_features: int, k_name: str = "k", n_name: str = "n_features") -> None:
    """1 <= k <= n_features: k active latents (or nonzeros per row) out of a dictionary of
    n_features. `k_name` and `n_name` say where the two came from (e.g. '--k', '--n-features')."""
    check_finite(k_name, k)
    need(k > 0, f"{k_name} {k} must be positive")
    need(k <= n_features, f"{k_name} {k} is larger than {n_name} {n_features}: k must be between 1 and n_features")


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a config field: its metadata's `flag`, else `--` + the name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (.toml), YAML (.yaml/.yml, needs pyyaml) or JSON file of config fields, as a dict."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # /dev/zero never ends; a FIFO waits for a writer
            raise SaekitError(f"--config {path} is not a regular file: pass a .toml, .yaml/.yml or .json file")
        text = path.read_text()
    except OSError as e:
        raise SaekitError(f"cannot read --config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SaekitError(
            f"--config {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise SaekitError(f"--config {path} must hold a table of flag names and values")
    return data


def _toml() -> Any:
    """Python 3.11's tomllib, or tomli (the same parser) on 3.10."""
    try:
        import tomllib  # lazy: only a --config .toml needs it

        return tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli  # pyright: ignore[reportMissingImports]

            return tomli
        except ImportError:
            raise SaekitError("reading a .toml --config needs Python 3.11+ or tomli: pip install tomli") from None


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return _toml().loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml  # lazy: optional: only a YAML --config needs it
            except ImportError:
                raise SaekitError(
                    f"--config {path} is YAML but pyyaml is not installed: pip install pyyaml, or use TOML"
                ) from None
            return yaml.safe_load(text) or {}
        if suffix == ".json":
            return json.loads(text)
    except SaekitError:
        raise
    except Exception as e:  # tomllib / yaml / json parse errors
        raise SaekitError(f"--config {path} does not parse: {one_line(e)}") from None
    raise SaekitError(f"--config {path}: use a .toml, .yaml/.yml or .json file")


def check_dict(cls: type, data: dict[str, Any], source: str, names: str) -> dict[str, Any]:
    """`data` with keys as `cls`'s field names and values of the fields' types, or one line naming
    the unknown key (a typo would otherwise be ignored) or the mistyped value. A key may be the
    field's name or its flag's, with `-` or `_` (`n-features`, `hook` for `hooks`). `names` says
    where the names are listed (e.g. "saekit train --help")."""
    keys, flags = {}, {}
    for f in dataclasses.fields(cls):
        flags[f.name] = flag_of(f).removeprefix("--")
        keys[f.name] = keys[flags[f.name].replace("-", "_")] = f.name
    d = {keys.get(str(k).replace("-", "_"), str(k).replace("-", "_")): v for k, v in data.items()}
    unknown = sorted(set(d) - set(keys.values()))
    if unknown:
        raise SaekitError(f"{source} has unknown key(s) {', '.join(unknown)}; see `{names}` for the names")
    return check_types(cls, d, source, flags)


def check_types(cls: type, data: dict[str, Any], source: str, names: dict[str, str] | None = None) -> dict[str, Any]:
    """`data` (field name -> value) checked against `cls`'s annotations; returns it with whole
    floats made ints and ints made floats where the field says so. Keys that are not fields are
    left to the caller (it knows which names to suggest). `names`: what to call a field in the
    error (default: its name with dashes)."""
    hints = typing.get_type_hints(cls)  # the annotations are strings (postponed evaluation)
    checked = {}
    for key, value in data.items():
        if key not in hints:
            checked[key] = value
            continue
        ok, converted = _convert(value, hints[key])
        if not ok:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            name = (names or {}).get(key) or key.replace("_", "-")
            raise SaekitError(f"{source}: {name} must be {_describe(hints[key])}, got {shown}")
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
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        return False, value  # inf and NaN are never a setting
    return isinstance(value, tp), value


_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    dict: "a table",
    type(None): "null",
}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_PLURALS.get(item, 'values')}"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))
