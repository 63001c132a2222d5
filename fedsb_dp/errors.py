"""Typed errors of the training toolkit.

Every error subclasses a built-in so callers can catch ``ValueError`` for bad input, and every
message names the offending value and the valid range.
"""

from __future__ import annotations


class FedSBError(Exception):
    """Base class of all fedsb-dp training-toolkit errors."""


class ConfigError(FedSBError, ValueError):
    """A setting is out of its valid range or inconsistent with another."""


class SettingError(ConfigError):
    """One setting's value is outside its valid range.

    It keeps the setting's name apart from the requirement, so that a front end can name the
    setting as its user wrote it (``--clip 0 must be > 0`` rather than ``max_grad_norm=0``).

    Attributes:
        setting: The setting's name (a ``RunConfig`` field name, or a front end's key).
        value: The bad value.
        requirement: What the value must be (``"must be > 0"``).

    """

    def __init__(self, setting: str, value: object, requirement: str) -> None:
        self.setting, self.value, self.requirement = setting, value, requirement
        super().__init__(f"{setting}={value!r} {requirement}")

    def __reduce__(self):
        # Exceptions are rebuilt from their arguments when they cross a process boundary
        # (sweep workers); the default would pass the message as the only argument.
        return (type(self), (self.setting, self.value, self.requirement))

    def named(self, shown: str) -> str:
        """The message with the setting written as ``shown`` (``"--clip 0"``)."""
        return f"{shown} {self.requirement}"


class ModelStructureError(ConfigError):
    """The model does not have the layers or shapes an adapter setting needs."""


class DataError(ConfigError):
    """A dataset, column or label value cannot be used as asked."""


class DataSettingError(DataError, SettingError):
    """The data or model one setting points at cannot be used; the CLI names the flag.

    ``DataSettingError("label_column", "stars", "is not a column …")`` reads
    ``--label-column stars is not a column …`` on the command line.
    """


class AdapterMismatchError(FedSBError, RuntimeError):
    """Frozen adapter factors differ from the ones the federation agreed on."""


class SettingsConflict(ConfigError):
    """Settings that are each valid but contradict one another.

    Like :class:`SettingError` it keeps the settings' names apart from the sentence, so a
    front end can write each one as its user did (``--epsilon 3 and --no-dp contradict each
    other``) rather than as field names.

    Attributes:
        settings: Name → value of every setting the message names, in the order given.
        template: The message, with ``{name}`` where each setting is named.

    """

    def __init__(self, settings: dict[str, object], template: str) -> None:
        self.settings, self.template = dict(settings), template
        super().__init__(self.named({}))

    def __reduce__(self):
        return (type(self), (self.settings, self.template))

    def named(self, shown: dict[str, str]) -> str:
        """The message with each setting written as ``shown[name]``, else ``name=value``."""
        return self.template.format(**{name: shown.get(name, f"{name}={value!r}")
                                       for name, value in self.settings.items()})
