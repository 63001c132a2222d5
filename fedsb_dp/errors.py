"""Typed errors of the training toolkit.

Every error subclasses a built-in so callers can catch ``ValueError`` for bad input, and every
message names the offending value and the valid range.
"""

from __future__ import annotations


class FedSBError(Exception):
    """Base class of all fedsb-dp training-toolkit errors."""


class ConfigError(FedSBError, ValueError):
    """A setting is out of its valid range or inconsistent with another."""


class ModelStructureError(ConfigError):
    """The model does not have the layers or shapes an adapter setting needs."""


class DataError(ConfigError):
    """A dataset, column or label value cannot be used as asked."""


class AdapterMismatchError(FedSBError, RuntimeError):
    """Frozen adapter factors differ from the ones the federation agreed on."""
