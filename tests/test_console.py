"""Only the front ends configure logging; library modules log through their own loggers."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# cli.py configures the console script's process; console.py holds what the front ends call.
ALLOWED = {"fedsb_dp/cli.py", "fedsb_dp/console.py"}
CONFIGURING = {"basicConfig", "setLevel", "addHandler", "removeHandler", "dictConfig",
               "fileConfig", "set_verbosity", "set_verbosity_error", "set_verbosity_warning",
               "disable_default_handler"}


def _configuring_calls(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in CONFIGURING):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.func.attr}(...)")
    return found


def test_library_modules_never_configure_logging():
    offenders = [call for package in ("fedsb_dp", "accounting")
                 for path in sorted((ROOT / package).rglob("*.py"))
                 if str(path.relative_to(ROOT)) not in ALLOWED
                 for call in _configuring_calls(path)]
    assert offenders == []
