"""The ``fedsb-dp run`` flags, generated from the :class:`RunConfig` settings.

Every setting gets ``--`` + its hyphenated name (``--max-grad-norm``), plus the older flags
users know as aliases (``--clip``). A boolean that defaults to true also gets
``--no-<name>``. The parser remembers what the user typed, so an error about a setting can
name the flag and the text as written (``--clip 0 must be > 0``).
"""

from __future__ import annotations

import argparse
from typing import Any

from fedsb_dp.errors import SettingError, SettingsConflict
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.settings import SettingField, parse_text, settings_of

#: Namespace attribute: setting name → the flag and text the user typed for it.
TYPED = "typed_settings"


def _remember(namespace: argparse.Namespace, name: str, typed: str) -> None:
    seen = dict(getattr(namespace, TYPED, None) or {})
    seen[name] = typed
    setattr(namespace, TYPED, seen)


class _ValueAction(argparse.Action):
    """Parses the text with the setting's own parser and remembers what was typed."""

    def __init__(self, option_strings: list[str], dest: str, *, item: SettingField,
                 **kwargs: Any) -> None:
        self.item = item
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            value = parse_text(self.item, values)
        except SettingError as exc:
            raise argparse.ArgumentError(self, f"{values!r} {exc.requirement}") from None
        setattr(namespace, self.dest, value)
        _remember(namespace, self.item.name, f"{option_string} {values}")


class _SwitchAction(argparse.Action):
    """Sets a boolean setting to ``const`` and remembers the switch."""

    def __init__(self, option_strings: list[str], dest: str, *, item: SettingField,
                 **kwargs: Any) -> None:
        self.item = item
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const)
        _remember(namespace, self.item.name, option_string)


def _help(item: SettingField) -> str:
    text = item.setting.help
    if item.setting.choices:
        text += f"; one of {', '.join(item.setting.choices)}"
    return f"{text} [default: {item.default_text()}]".replace("%", "%%")


def _metavar(item: SettingField) -> str:
    if item.kind.many:
        return "LIST"
    if item.setting.choices:
        return "NAME"
    return {int: "INT", float: "NUM", str: "TEXT"}[item.kind.base]


def dest_of(item: SettingField) -> str:
    """The namespace attribute of a setting's flag."""
    return f"setting.{item.name}"


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`RunConfig` setting (and its aliases) to ``parser``.

    Flags default to "not given" (the attribute is absent), so a TOML file's value is only
    overridden by a flag the user typed.
    """
    group = parser.add_argument_group(
        "run settings", "one per RunConfig field; the same names (with _ for -) are the "
        "--config TOML keys, the 'fedsb-dp sweep --set' keys and the Flower run config keys")
    for item in settings_of(RunConfig):
        common = dict(dest=dest_of(item), item=item, default=argparse.SUPPRESS)
        if item.kind.base is bool and not item.kind.many:
            group.add_argument(item.flag, action=_SwitchAction, const=True, help=_help(item),
                               **common)
            off = [f"--no-{item.key}"] if item.default else []
            off += [item.setting.off_alias] if item.setting.off_alias else []
            if off:
                group.add_argument(*off, action=_SwitchAction, const=False,
                                   help=f"set {item.flag} off", **common)
        else:
            group.add_argument(item.flag, *item.setting.aliases, action=_ValueAction,
                               metavar=_metavar(item), help=_help(item), **common)


def values_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by field name."""
    return {item.name: getattr(args, dest_of(item)) for item in settings_of(RunConfig)
            if hasattr(args, dest_of(item))}


def describe_error(exc: SettingError | SettingsConflict, args: argparse.Namespace) -> str:
    """``exc`` naming each setting as the user gave it: the flag typed, or the TOML file."""
    typed = getattr(args, TYPED, None) or {}
    names = [exc.setting] if isinstance(exc, SettingError) else list(exc.settings)
    if isinstance(exc, SettingError):
        message = exc.named(typed[exc.setting]) if exc.setting in typed else str(exc)
    else:
        message = exc.named({name: typed[name] for name in names if name in typed})
    config_file = getattr(args, "config", None)
    if config_file and any(name not in typed for name in names):
        return f"{message} (in {config_file})"
    return message
