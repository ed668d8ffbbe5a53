"""Frozen dataclasses from layers of TOML: a loader that knows no schema, only dataclasses.

A `Loader` is given the top dataclass (whose fields are values or dataclasses of their own, the
TOML's sections) and the error type every refusal raises. It checks each layer (a TOML file, a
dict, one `key=value` override) against the dataclasses' fields before merging it over the
layers before it: an unknown section or key is refused naming the key, its layer, the allowed
keys and the closest one; a section given as a value (or the reverse) is refused; a value of the
wrong type is refused naming the type expected. Then the dataclasses are built from the merged
dict (missing keys take their defaults), and their own checks run: a dataclass refuses a value by
raising `FieldError`, which the loader names with the dotted key and the layer that set it.

Field types it reads: bool, int, float (an int is taken as a float; nan and inf are refused), str,
`Literal[...]`, fixed tuples (`tuple[int, int, int]`) and `tuple[X, ...]`, from TOML lists.
Standard library only: this module sits at the bottom of the import graph, under `config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class FieldError(ValueError):
    """Raised by a dataclass's own checks (`__post_init__`) for one of its fields: `name` the
    field, `message` what is wrong. The loader prefixes the section and names the layer."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@dataclass(frozen=True)
class Loader:
    """Builds `root` (a dataclass) from layers of nested dicts, refusing with `error`."""

    root: type
    error: type[Exception] = ValueError

    def read(self, path: Path) -> dict:
        """A TOML file as a dict; `error` if it is missing or not TOML."""
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            raise self.error(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise self.error(f"{path} is not valid TOML: {e}") from None

    def build(self, layers: list[tuple[str, dict]]) -> Any:
        """`root` from (source, layer) pairs, later layers over earlier ones; each layer is
        checked before it is merged, and `source` names it in every refusal."""
        merged: dict = {}
        origins: dict[str, str] = {}  # dotted key -> the layer that set it last
        for source, layer in layers:
            self._check_keys(layer, self.root, "", source, origins)
            merge(merged, layer)
        return self._build(self.root, merged, "", origins)

    def layer(self, key: str, text: str, source: str) -> dict:
        """`a.b.c`, text -> {"a": {"b": {"c": value}}}, the value parsed for the field's type:
        a TOML literal (`true`, `[64, 64, 64]`, `1e-4`), else the text as a string (so a bare
        `att_equiunet` needs no quotes); a string field takes the text as written."""
        parts = key.split(".")
        cls: Any = self.root
        for i, part in enumerate(parts):
            hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}  # type: ignore[arg-type]
            prefix = ".".join(parts[:i]) + "." if i else ""
            if not hints:
                raise self.error(f"{source}: {prefix[:-1]!r} is a value, it has no key {part!r}")
            if part not in hints:
                raise self.error(_unknown_key(key, source, prefix, list(hints)))
            cls = hints[part]
        if dataclasses.is_dataclass(cls):
            raise self.error(
                f"{source}: {key!r} is a section; set one of its keys ({', '.join(f'{key}.{k}' for k in _hints(cls))})"  # type: ignore[arg-type]
            )
        value = _parse_value(text, cls)
        for part in reversed(parts):
            value = {part: value}
        return value

    def _check_keys(self, layer: dict, cls: type, prefix: str, source: str, origins: dict[str, str]) -> None:
        """Unknown keys, and sections given as values or values as sections; records origins."""
        hints = _hints(cls)
        for key, value in layer.items():
            dotted = prefix + key
            if key not in hints:
                raise self.error(_unknown_key(dotted, source, prefix, list(hints)))
            if dataclasses.is_dataclass(hints[key]):
                if not isinstance(value, dict):
                    raise self.error(
                        f"{dotted} in {source} is a section ([{dotted}]), not a value; set its keys "
                        f"instead ({', '.join(f'{dotted}.{k}' for k in _hints(hints[key]))})"
                    )
                self._check_keys(value, hints[key], dotted + ".", source, origins)
            else:
                if isinstance(value, dict):
                    raise self.error(f"{dotted} in {source} is a value, not a section; expected {_describe(hints[key])}")
                origins[dotted] = source

    def _build(self, cls: type, data: dict, prefix: str, origins: dict[str, str]) -> Any:
        kwargs = {}
        for name, hint in _hints(cls).items():
            if name not in data:
                continue
            dotted = prefix + name
            if dataclasses.is_dataclass(hint):
                kwargs[name] = self._build(hint, data[name], dotted + ".", origins)  # type: ignore[arg-type]
            else:
                kwargs[name] = self._convert(data[name], hint, dotted, origins.get(dotted, "<dict>"))
        try:
            return cls(**kwargs)
        except FieldError as e:
            dotted = prefix + e.name
            source = origins.get(dotted, "the defaults")
            raise self.error(f"{dotted} (from {source}): {e.message}") from None

    def _convert(self, value: Any, hint: Any, key: str, source: str) -> Any:
        """Check `value` against a field's type; ints are accepted (and converted) for floats."""
        origin = typing.get_origin(hint)
        ok = True
        if origin is Literal:
            choices = typing.get_args(hint)
            if value not in choices or isinstance(value, bool):
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                hint_text = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    f"{key} in {source}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint_text}"
                )
            return value
        if origin is tuple:
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):  # tuple[str, ...]
                return tuple(self._convert(v, args[0], key, source) for v in value)
            if isinstance(value, (list, tuple)) and len(value) == len(args):
                return tuple(self._convert(v, a, key, source) for v, a in zip(value, args))
            ok = False
        elif hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
            if ok and not math.isfinite(value):  # TOML has nan and inf; no setting here means either
                raise self.error(f"{key} in {source}: expected a finite number, got {value!r}")
        elif hint is str:
            ok = isinstance(value, str)
        else:  # pragma: no cover - a field type this module does not handle yet
            raise TypeError(f"unsupported config field type {hint!r} for {key}")
        if not ok:
            raise self.error(f"{key} in {source}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")
        return value


def merge(into: dict, layer: dict) -> None:
    """Merge the nested dict `layer` into `into`: sections key by key, values replaced."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, dict) else value


def format_value(value: Any) -> str:
    """A plain value (bool, number, string, list) as the text `Loader.layer` reads back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # inside a list, strings are quoted: TOML, so it reads back
        return "[" + ", ".join(json.dumps(v) if isinstance(v, str) else format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- implementation --------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(dotted: str, source: str, prefix: str, allowed: list[str]) -> str:
    where = f"[{prefix[:-1]}]" if prefix else "the top level"
    msg = f"unknown key {dotted!r} in {source}"
    close = difflib.get_close_matches(dotted.rsplit(".", 1)[-1], allowed, n=1)
    if close:
        msg += f"; did you mean {prefix + close[0]!r}?"
    return msg + f" Allowed keys in {where}: {', '.join(allowed)}"


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], _describe(args[0]))
        return f"a list of {len(args)} " + {int: "integers", float: "numbers"}.get(args[0], _describe(args[0]))
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _parse_value(text: str, hint: Any) -> Any:
    stringly = hint is str or (typing.get_origin(hint) is Literal and all(isinstance(c, str) for c in typing.get_args(hint)))
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # not a TOML literal: a bare string such as att_equiunet or data/x
    # A string field takes the text as written (`data.dataset=1` is the folder "1"), unless the
    # text was a quoted TOML string.
    if stringly and not isinstance(value, str):
        return text
    return value
