"""What a run setting is, apart from its value: help, unit, aliases, and how text becomes a value.

Each :class:`~fedsb_dp.federated.run_config.RunConfig` field carries a :class:`Setting` in its
dataclass metadata. The front ends read it instead of keeping their own lists, so a setting
has one name everywhere:

========================  ==========================  ============================
front end                 form of the name            example
========================  ==========================  ============================
Python, TOML, sweep       field name                  ``max_grad_norm = 3.0``
``fedsb-dp run``          ``--`` + hyphenated name    ``--max-grad-norm 3`` (alias
                                                      ``--clip``)
Flower run config         hyphenated name             ``max-grad-norm = 3.0``
========================  ==========================  ============================

Text (a CLI argument, a ``sweep --set`` value, a Flower string) becomes a value through
:func:`parse_text`, the same way for every front end.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from typing import Any

from fedsb_dp.errors import SettingError

#: Key of the :class:`Setting` in a dataclass field's metadata.
SETTING_KEY = "fedsb_dp.setting"


@dataclass(frozen=True)
class Setting:
    """The user-facing description of one run setting.

    Attributes:
        help: One line for ``--help``: what the setting does (no default, no unit).
        unit: Unit of a number (``"records"``, ``"tokens"``); ``None`` if it has none.
        aliases: Older CLI flags that keep working (``"--clip"``); the canonical flag is
            always ``--`` + the hyphenated field name.
        off_alias: A CLI switch that sets a boolean to ``False`` (``"--frozen-head"``).
        unset: What the default ``None`` means, shown as the default (``"OS entropy"``).
        choices: The valid values of a setting that is one of a few names.

    """

    help: str
    unit: str | None = None
    aliases: tuple[str, ...] = ()
    off_alias: str | None = None
    unset: str | None = None
    choices: tuple[str, ...] | None = None


def setting(default: Any, help: str, *, unit: str | None = None,  # noqa: A002 (argparse's word)
            aliases: tuple[str, ...] = (), off_alias: str | None = None,
            unset: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose metadata describes it (see :class:`Setting`)."""
    return field(default=default, metadata={SETTING_KEY: Setting(
        help=help, unit=unit, aliases=aliases, off_alias=off_alias, unset=unset,
        choices=choices)})


@dataclass(frozen=True)
class Kind:
    """The value type of a setting, read from its annotation.

    Attributes:
        base: ``int``, ``float``, ``bool`` or ``str`` (of each item, for a list).
        many: A tuple of ``base`` values (comma-separated in text).
        optional: ``None`` is a valid value.

    """

    base: type
    many: bool
    optional: bool

    def describe(self) -> str:
        """A few words for an error message: what a valid value looks like."""
        one = {int: "an integer", float: "a number", bool: "true or false",
               str: "a string"}[self.base]
        text = f"a comma-separated list of {one.split(' ', 1)[1]}s" if self.many else one
        return text + (" (or empty for unset)" if self.optional else "")


@dataclass(frozen=True)
class SettingField:
    """One setting of a settings dataclass: its name, default, description and kind."""

    name: str
    default: Any
    setting: Setting
    kind: Kind

    @property
    def key(self) -> str:
        """The hyphenated name of CLI flags and the Flower run config."""
        return self.name.replace("_", "-")

    @property
    def flag(self) -> str:
        """The canonical CLI flag."""
        return "--" + self.key

    def default_text(self) -> str:
        """The default as ``--help`` shows it, with its unit."""
        if self.default is None:
            return self.setting.unset or "unset"
        value = self.default
        if isinstance(value, bool):
            value = str(value).lower()
        return f"{value} {self.setting.unit}" if self.setting.unit else str(value)


def _kind(annotation: Any) -> Kind:
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    if optional:
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return Kind(typing.get_args(annotation)[0], True, optional)
    if annotation not in (int, float, bool, str):
        raise TypeError(f"setting type {annotation!r} is not int, float, bool, str or a tuple")
    return Kind(annotation, False, optional)


@cache
def settings_of(cls: type) -> tuple[SettingField, ...]:
    """Every field of the settings dataclass ``cls``, in declaration order.

    Raises:
        TypeError: A field lacks a :class:`Setting` or has an unsupported type (a
            programming error, caught by the tests).

    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if SETTING_KEY not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no Setting metadata; declare it "
                            "with fedsb_dp.federated.settings.setting()")
        out.append(SettingField(f.name, _default(f), f.metadata[SETTING_KEY],
                                _kind(hints[f.name])))
    return tuple(out)


def _default(f: Field) -> Any:
    if f.default is MISSING:
        raise TypeError(f"setting {f.name} needs a default")
    return f.default


def by_name(cls: type) -> dict[str, SettingField]:
    """The settings of ``cls`` by field name."""
    return {s.name: s for s in settings_of(cls)}


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _one(kind: Kind, text: str) -> Any:
    if kind.base is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    return kind.base(text)


def parse_text(item: SettingField, text: str, *, shown: str | None = None) -> Any:
    """The value of ``item`` written as ``text`` (a flag's argument, a ``--set`` value).

    The empty string is ``None`` for an optional setting (as in the Flower run config); a list
    is comma-separated (or a JSON list).

    Args:
        item: The setting.
        text: What the user wrote.
        shown: How the error names the setting (default: its field name).

    Raises:
        SettingError: ``text`` is not a value of the setting's type.

    """
    text = text.strip()
    if item.kind.optional and (text == "" or (
            item.kind.base is not str and text.lower() in ("none", "null"))):
        return None
    try:
        if item.kind.many:
            parts = json.loads(text) if text.startswith("[") else text.split(",")
            return tuple(_one(item.kind, str(p).strip()) for p in parts if str(p).strip())
        return _one(item.kind, text)
    except ValueError:
        raise SettingError(shown or item.name, text, f"must be {item.kind.describe()}") from None


def _fits(kind: Kind, value: Any) -> bool:
    if kind.base is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never a count or a rate here
        return False
    if kind.base is float:
        return isinstance(value, int | float)
    return isinstance(value, kind.base)


def check_type(item: SettingField, value: Any) -> None:
    """Raise :class:`SettingError` unless ``value`` has the type of ``item``.

    Numbers stay as given (an ``int`` is a valid ``float`` setting) so that the digest of a
    configuration does not change when it is read back.
    """
    if value is None and item.kind.optional:
        return
    if item.kind.many and isinstance(value, tuple | list):
        if all(_fits(item.kind, v) for v in value):
            return
    elif not item.kind.many and _fits(item.kind, value):
        return
    raise SettingError(item.name, value, f"must be {item.kind.describe()}")
