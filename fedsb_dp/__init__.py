"""fedsb-dp: differentially private federated fine-tuning with Fed-SB (LoRA-SB adapters).

The public Python API (see the README's "As a library")::

    from fedsb_dp import RunConfig, run, resume, load_run

Its names are imported on first use, so ``import fedsb_dp`` stays fast and imports neither
torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name → the module that defines it (imported on first attribute access).
_EXPORTS = {
    "RunConfig": "fedsb_dp.federated.run_config",
    "Run": "fedsb_dp.runs",
    "run": "fedsb_dp.runs",
    "resume": "fedsb_dp.runs",
    "load_run": "fedsb_dp.runs",
    "ConfigError": "fedsb_dp.errors",
    "DataError": "fedsb_dp.errors",
}

__all__ = ["ConfigError", "DataError", "Run", "RunConfig", "__version__", "load_run", "resume",
           "run"]

if TYPE_CHECKING:
    from fedsb_dp.errors import ConfigError, DataError
    from fedsb_dp.federated.run_config import RunConfig
    from fedsb_dp.runs import Run, load_run, resume, run


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsb_dp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
