"""``fedsb-dp run`` on the user's own data and model: clear errors, natural clients, new heads."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

import fedsb_dp
from fedsb_dp.cli import main


@pytest.fixture(scope="module")
def five_label_checkpoint(tmp_path_factory):
    """A MiniLM sequence classifier saved with a 5-label head, and a copy without tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedsb_dp.models import resolve_model_path

    base = resolve_model_path("minilm")
    root = tmp_path_factory.mktemp("checkpoints")
    full = root / "minilm-5-labels"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=5)
    model.save_pretrained(full)
    AutoTokenizer.from_pretrained(base).save_pretrained(full)
    bare = root / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(full / name, bare / name)
    return str(full), str(bare)


def _sites_csv(path, counts: dict[str, int]) -> str:
    rows = []
    for site, count in counts.items():
        rows += [{"note": f"{site} visit {i}: patient {'improved' if i % 2 else 'worsened'} "
                          f"after treatment {i % 5}", "outcome": ["worse", "better"][i % 2],
                  "site": site} for i in range(count)]
    pd.DataFrame(rows).sample(frac=1.0, random_state=1).to_csv(path, index=False)
    return str(path)


def _fails(capsys, argv: list[str], out: str, message: str) -> None:
    """Exit 2, one ``fedsb-dp: error:`` line containing ``message``, no run directory."""
    assert main(["run", *argv, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedsb-dp: error: "), err
    assert message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert not os.path.exists(out)


def test_cli_errors_name_the_flag_and_leave_no_run_directory(tmp_path, capsys,
                                                             five_label_checkpoint):
    csv = _sites_csv(tmp_path / "notes.csv", {"a": 40, "b": 40})
    out = str(tmp_path / "run")
    broken = tmp_path / "broken.parquet"
    broken.write_text("this is not parquet")
    _fails(capsys, ["--no-dp", "--dataset", str(broken)], out,
           f"--dataset {broken} cannot be read as PARQUET (ArrowInvalid")
    _fails(capsys, ["--no-dp", "--dataset", csv, "--text-column", "note", "--label-column",
                    "stars"], out, "--label-column stars is not a column of the dataset; its "
                                   "columns: ['note', 'outcome', 'site']")
    _fails(capsys, ["--no-dp", "--dataset", csv, "--text-column", "note", "--label-column",
                    "outcome", "--partition", "column:hospital"], out,
           "--partition column:hospital names column 'hospital', which the dataset lacks")
    scores = tmp_path / "scores.csv"
    pd.DataFrame({"text": [f"t {i}" for i in range(40)], "score": [0.3, 1.7] * 20}).to_csv(
        scores, index=False)
    _fails(capsys, ["--no-dp", "--dataset", str(scores), "--label-column", "score"], out,
           "--label-column score holds fractional numbers (e.g. 0.3)")
    _, no_tokenizer = five_label_checkpoint
    _fails(capsys, ["--no-dp", "--dataset", csv, "--text-column", "note", "--label-column",
                    "outcome", "--model", no_tokenizer, "--batch-size", "8"], out,
           f"--model {no_tokenizer} has a tokenizer of 5 tokens for a vocabulary of 30522: "
           "its tokenizer files (tokenizer.json, vocab.txt, …) are missing")


@pytest.mark.slow
def test_natural_partition_run_with_a_five_label_checkpoint(tmp_path, caplog,
                                                            five_label_checkpoint):
    checkpoint, _ = five_label_checkpoint
    csv = _sites_csv(tmp_path / "notes.csv", {"st-mary": 50, "general": 70, "north-7": 60})
    out = str(tmp_path / "run")
    # RDP calibrates in seconds; PLD/PRV at these small Nᵢ take minutes on a loaded CPU.
    argv = ["run", "--epsilon", "3", "--accountant", "rdp", "--dataset", csv,
            "--text-column", "note", "--label-column", "outcome", "--partition", "column:site",
            "--clients", "3",
            "--model", checkpoint, "--rounds", "1", "--local-steps", "2", "--batch-size", "8",
            "--max-length", "32", "--max-eval-records", "16", "--rank", "4", "--seed", "0",
            "--no-progress",
            "--out", out]
    assert main(argv) == 0
    assert "5-label classification head was replaced by a fresh 2-label head" in caplog.text
    with open(os.path.join(out, "provenance.json")) as fh:
        assert "fresh 2-label head" in json.load(fh)["model_notes"][0]
    run = fedsb_dp.load_run(out)
    with open(os.path.join(out, "partition.json")) as fh:
        clients = json.load(fh)["clients"]
    train = pd.read_csv(csv)
    # One ledger client per site, each sampled and accounted with its own Nᵢ.
    assert sorted(c["value"] for c in clients.values()) == ["general", "north-7", "st-mary"]
    assert run.ledger.dataset_sizes == {cid: c["records"] for cid, c in clients.items()}
    assert run.ledger.plan.sampling_probabilities == pytest.approx(
        {cid: 8 / c["records"] for cid, c in clients.items()})
    for c in clients.values():
        assert 0 < c["records"] <= int((train["site"] == c["value"]).sum())
    assert len({r.epsilon for r in run.privacy().per_client.values()}) == 3  # three Nᵢ, three ε
    with open(os.path.join(out, "ledger.json")) as fh:  # released: no site names
        assert not any(site in fh.read() for site in ("general", "north-7", "st-mary"))


def test_a_checkpoint_head_of_another_size_is_replaced(five_label_checkpoint):
    from fedsb_dp.models import find_head, load_model

    checkpoint, _ = five_label_checkpoint
    loaded = load_model(checkpoint, num_labels=3)
    assert find_head(loaded.model)[1].out_features == 3
    assert loaded.notes == ("the checkpoint's 5-label classification head was replaced by a "
                            "fresh 3-label head (this dataset has 3 labels)",)
    assert load_model("minilm").notes == ()  # an encoder without a head: nothing replaced
