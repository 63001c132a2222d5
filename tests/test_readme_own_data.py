"""The README's "Bring your own data" commands, run up to the model on files like theirs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import datasets
import pandas as pd

import fedsb_dp
from fedsb_dp.cli import _run_config, build_parser
from fedsb_dp.federated.setup import load_data, partition_frames

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Bring your own data")
    return text[start:text.index("\n## ", start + 1)]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S)


def _commands() -> list[str]:
    joined = "\n".join(_blocks("bash")).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("fedsb-dp")]


def _files(folder: Path) -> None:
    """Files with the README's names and columns."""
    n = 120
    pd.DataFrame({"review": [f"review {i} of a {'fine' if i % 2 else 'poor'} film"
                             for i in range(n)],
                  "stars": [i % 3 + 1 for i in range(n)]}).to_csv(folder / "reviews.csv",
                                                                   index=False)
    pd.DataFrame({"premise": [f"premise {i}" for i in range(n)],
                  "hypothesis": [f"hypothesis {i}" for i in range(n)],
                  "label": ["entailment", "contradiction"] * (n // 2)}).to_json(
        folder / "pairs.jsonl", orient="records", lines=True)
    rows = [{"note": f"{site} visit {i}", "outcome": ["worse", "better"][i % 2], "site": site}
            for site in ("a", "b", "c") for i in range(60)]
    pd.DataFrame(rows).to_csv(folder / "notes.csv", index=False)
    (folder / "sst2.toml").write_text(_blocks("toml")[0], encoding="utf-8")


def _glue(*_args, **_kwargs) -> datasets.DatasetDict:
    def part(n: int, offset: int, hidden: bool = False) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "sentence": [f"sentence {i}" for i in range(offset, offset + n)],
            "label": [-1 if hidden else i % 2 for i in range(n)]})
    return datasets.DatasetDict({"train": part(150, 0), "validation": part(20, 500),
                                 "test": part(20, 900, hidden=True)})


def test_readme_section_commands_load_their_data(tmp_path, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", _glue)
    commands = _commands()
    assert len(commands) == 5
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        config = _run_config(args)
        data = load_data(config)
        frames, _ = partition_frames(config, data, partition_seed=0)
        assert len(frames) == config.clients, command
        if config.dataset_config == "sst2":
            assert data.splits["test"].startswith("hashed from the training pool")


def test_readme_section_python_block(tmp_path, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen = {}

    def prepare_only(config=None, /, *, data=None, **settings):
        # everything fedsb_dp.run does before the model loads
        from fedsb_dp.runs import _settings

        resolved = _settings(config, settings, data)
        seen["frames"], _ = partition_frames(resolved, load_data(resolved, data=data),
                                             partition_seed=0)

    monkeypatch.setattr(fedsb_dp, "run", prepare_only)
    (block,) = _blocks("python")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 (the README's own snippet)
    assert len(seen["frames"]) == 3
