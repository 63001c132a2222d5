"""Console hygiene shared by the CLI and the benchmark scripts."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import IO

from fedsb_dp.narration import LOGGER

_HANDLER_MARK = "_fedsb_dp_narration"


def quiet_expected_warnings(*, transformers_reports: bool = True) -> None:
    """Silence warnings that are expected in every run and say nothing actionable.

    dp_accounting's RDP accountant logs every order it skips at small σ (calibration probes
    those; the skipped orders only loosen that cross-check), and torch notes that full backward
    hooks see module outputs only when no layer input requires grad — which is all Opacus'
    Linear grad sampler reads in an adapter-only model. transformers prints a load report for
    every classifier built on an encoder checkpoint (the new head is "MISSING" by design);
    ``transformers_reports=False`` keeps it (``fedsb-dp --verbose``).
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if transformers_reports:
        import transformers

        transformers.logging.set_verbosity_error()


def show_narration(enabled: bool = True, stream: IO[str] | None = None) -> None:
    """Print narration to ``stream`` (stderr by default), or silence it.

    The lines are what :func:`fedsb_dp.narration.say` says (status, one line per round).
    Idempotent: calling it again replaces the earlier handler.

    Args:
        enabled: Whether lines are printed.
        stream: Where they go; ``None`` is ``sys.stderr`` at the time of each line (so pytest's
            capture sees them).
    """
    narration_logger = logging.getLogger(LOGGER)
    for handler in list(narration_logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            narration_logger.removeHandler(handler)
    narration_logger.propagate = False  # never twice, whatever the root logger does with -v
    if not enabled:
        narration_logger.setLevel(logging.WARNING)
        return
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    narration_logger.addHandler(handler)
    narration_logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A handler that looks ``sys.stderr`` up for every line (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        # Assigned, not setStream(): that flushes the old stream, which may be closed.
        self.stream = sys.stderr
        super().emit(record)
