"""The generic loader on a schema of its own (two small dataclasses), so what it does is seen apart
from brats-lab's config: layers checked before they merge, refusals that name the key and the
layer, a dataclass's own check named by its dotted key, and `format_value` read back by `layer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from brats_lab.dataclass_toml import FieldError, Loader, format_value, merge


class Refused(ValueError):
    pass


@dataclass(frozen=True)
class Inner:
    size: tuple[int, int] = (2, 2)
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if min(self.size) < 1:
            raise FieldError("size", f"must be positive, got {list(self.size)}")


@dataclass(frozen=True)
class Outer:
    rate: float = 0.5
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


LOADER = Loader(Outer, Refused)


def test_later_layers_win_and_missing_keys_take_the_defaults() -> None:
    built = LOADER.build([("one", {"rate": 1, "inner": {"mode": "b"}}), ("two", {"inner": {"size": [3, 4]}})])
    assert built == Outer(rate=1.0, inner=Inner(size=(3, 4), mode="b"))
    assert isinstance(built.rate, float)


def test_refusals_name_the_key_the_layer_and_what_was_expected() -> None:
    with pytest.raises(Refused, match=r"^unknown key 'inner.mod' in two; did you mean 'inner.mode'\? Allowed keys in \[inner\]: size, mode$"):
        LOADER.build([("one", {}), ("two", {"inner": {"mod": "a"}})])
    with pytest.raises(Refused, match=r"^inner in f.toml is a section \(\[inner\]\), not a value; set its keys instead \(inner.size, inner.mode\)$"):
        LOADER.build([("f.toml", {"inner": 3})])
    with pytest.raises(Refused, match=r"^rate in f.toml: expected a number, got 'fast' \(str\)$"):
        LOADER.build([("f.toml", {"rate": "fast"})])
    with pytest.raises(Refused, match=r"^inner.size \(from --set inner.size=\[0, 1\]\): must be positive, got \[0, 1\]$"):
        LOADER.build([("--set inner.size=[0, 1]", LOADER.layer("inner.size", "[0, 1]", "--set inner.size=[0, 1]"))])


def test_a_layer_parses_toml_literals_and_takes_other_text_as_a_string() -> None:
    assert LOADER.layer("inner.size", "[5, 6]", "s") == {"inner": {"size": [5, 6]}}
    assert LOADER.layer("name", "1", "s") == {"name": "1"}  # a string field takes the text as written
    assert LOADER.layer("inner.mode", "b", "s") == {"inner": {"mode": "b"}}
    with pytest.raises(Refused, match=r"^s: 'inner' is a section; set one of its keys \(inner.size, inner.mode\)$"):
        LOADER.layer("inner", "1", "s")


def test_format_value_is_the_text_a_layer_reads_back() -> None:
    assert [format_value(v) for v in (True, 0.1, 3, "a b", ["x", "y"])] == ["true", "0.1", "3", "a b", '["x", "y"]']
    assert LOADER.layer("rate", format_value(0.1), "s") == {"rate": 0.1}
    assert LOADER.layer("inner.size", format_value([3, 4]), "s") == {"inner": {"size": [3, 4]}}
    assert LOADER.layer("name", format_value("a b"), "s") == {"name": "a b"}


def test_merge_goes_section_by_section() -> None:
    into = {"inner": {"size": [1, 1]}, "rate": 1}
    merge(into, {"inner": {"mode": "b"}, "rate": 2})
    assert into == {"inner": {"size": [1, 1], "mode": "b"}, "rate": 2}
