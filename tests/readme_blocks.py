"""The README's "Use the trained model" snippets, so the tests run exactly what it shows."""

from __future__ import annotations

import os
import re
import shlex

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def block(tag: str) -> str:
    """The fenced code block right after ``<!-- tag -->`` in the README."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    found = re.search(rf"<!-- {re.escape(tag)} -->\n```\w+\n(.*?)```", text, re.S)
    assert found, f"README has no block tagged {tag}"
    return found.group(1)


def commands(tag: str, replacements: dict[str, str]) -> list[list[str]]:
    """The block's ``fedsb-dp`` command lines as argv lists (after the program name)."""
    out = []
    for line in block(tag).splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[0] == "fedsb-dp", line
            out.append([replacements.get(a, a) for a in argv[1:]])
    return out


def run_python(tag: str, replacements: dict[str, str]) -> dict:
    """Execute the block with its quoted placeholders replaced; return its namespace."""
    code = block(tag)
    for old, new in replacements.items():
        assert f'"{old}"' in code, old
        code = code.replace(f'"{old}"', repr(new))
    namespace: dict = {}
    exec(compile(code, f"README:{tag}", "exec"), namespace)  # noqa: S102
    return namespace
