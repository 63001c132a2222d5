"""The public Python API: run on in-memory data, load_run, resume, and what they refuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from safetensors.torch import load_file

import fedsb_dp
from fedsb_dp.data import IN_MEMORY_DATASET, load_rotten_tomatoes
from fedsb_dp.errors import ConfigError, DataError

# Tiny but real: the offline MiniLM, real reviews, real Opacus. RDP calibrates in a blink and a
# random orthonormal start skips the SVDs; neither matters to what these tests compare.
SMALL = dict(epsilon=3.0, seed=5, clients=2, rounds=2, local_steps=1, batch_size=4,
             max_length=16, rank=2, max_train_records=120, max_eval_records=16,
             accountant="rdp", init="random-orthonormal")


def _adapter(run_dir: str) -> dict:
    directory = os.path.join(run_dir, "final_adapter")
    (name,) = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    return load_file(os.path.join(directory, name))


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


@pytest.fixture(scope="module")
def reviews() -> pd.DataFrame:
    """300 real Rotten Tomatoes snippets with their string labels."""
    return load_rotten_tomatoes().head(300).reset_index(drop=True)


@pytest.fixture(scope="module")
def frame_run(reviews, tmp_path_factory):
    """A seeded run on the DataFrame, through the public API."""
    out = tmp_path_factory.mktemp("api") / "frame"
    return fedsb_dp.run(data=reviews, out=str(out), **SMALL)


def test_import_is_lazy():
    """``import fedsb_dp`` pulls in no torch; ``accounting`` stays torch-free."""
    code = ("import sys, fedsb_dp, accounting; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    from fedsb_dp.federated.run_config import RunConfig

    assert fedsb_dp.RunConfig is RunConfig and "load_run" in dir(fedsb_dp)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedsb_dp.nope  # noqa: B018


@pytest.mark.slow
def test_dataframe_run_equals_csv_run_and_resume(frame_run, reviews, tmp_path):
    """The same rows from a file, interrupted and resumed, train the same model bit for bit."""
    from fedsb_dp.federated.inprocess import run_federation

    path = tmp_path / "reviews.csv"
    reviews.to_csv(path, index=False)
    config = fedsb_dp.RunConfig(dataset=str(path), out=str(tmp_path / "csv"), **SMALL)
    first = run_federation(config, progress=False, stop_after_rounds=1)
    assert first.status == "interrupted"
    # A file edited between the two halves is refused before anything is spent.
    reviews.iloc[1:].to_csv(path, index=False)
    ledger = open(os.path.join(first.run_dir, "ledger.json")).read()
    with pytest.raises(ConfigError, match="differ from the data run"):
        fedsb_dp.resume(first.run_dir)
    assert open(os.path.join(first.run_dir, "ledger.json")).read() == ledger
    reviews.to_csv(path, index=False)
    from_file = fedsb_dp.resume(first.run_dir)

    assert frame_run.status == from_file.status == "completed"
    assert frame_run.config.dataset == IN_MEMORY_DATASET
    _same_tensors(_adapter(frame_run.path), _adapter(from_file.path))
    assert frame_run.ledger.to_json_dict()["body"]["entries"] == from_file.ledger.to_json_dict()[
        "body"]["entries"]
    assert frame_run.ledger.dataset_sizes == from_file.ledger.dataset_sizes
    columns = ["round", "validation_accuracy", "validation_loss", "epsilon", "bytes_up"]
    pd.testing.assert_frame_equal(frame_run.metrics[columns], from_file.metrics[columns])
    assert frame_run.summary["test_accuracy"] == from_file.summary["test_accuracy"]
    with pytest.raises(ConfigError, match="has finished"):
        fedsb_dp.resume(from_file.path)


@pytest.mark.slow
def test_load_run_round_trips(frame_run, reviews):
    from fedsb_dp.federated.setup import Evaluator, load_data
    from fedsb_dp.sweep.archive import AUDIT_FILES

    run = fedsb_dp.load_run(frame_run.path)
    assert run.config == frame_run.config and run.summary == frame_run.summary
    assert list(run.metrics["round"]) == [1, 2]
    assert run.epsilon() == run.summary["privacy"]["epsilon"] <= 3.0
    assert run.epsilon("pld") <= run.epsilon("rdp")
    assert run.privacy().per_client.keys() == {"client-0", "client-1"}
    # Seeded for the comparison, so the audit rightly flags the noise as no release.
    report = run.audit()
    assert [name for name, _, _ in report.failures] == ["noise is a private release"]
    # The trained model comes back with its adapters: same test accuracy as the run's.
    loaded = run.load_model()
    data = load_data(run.config, data=reviews)
    test = Evaluator.build(run.config, data, loaded.tokenizer).evaluate(loaded.model, "test")
    assert test["accuracy"] == run.summary["test_accuracy"]
    assert loaded.model.config.id2label == {0: "fresh", 1: "rotten"}
    # The data digest stays with the operator: in data.json, never in a released file.
    assert run._read("data.json", {})["digest"] == data.digest
    assert "data.json" not in AUDIT_FILES
    for name in AUDIT_FILES:
        with open(os.path.join(run.path, name), encoding="utf-8") as fh:
            assert data.digest not in fh.read(), name


@pytest.mark.slow
def test_resume_refuses_other_in_memory_data(reviews, tmp_path):
    from fedsb_dp.federated.inprocess import run_federation

    config = fedsb_dp.RunConfig(dataset=IN_MEMORY_DATASET, out=str(tmp_path / "r"), **SMALL)
    started = run_federation(config, data=reviews, progress=False, stop_after_rounds=0)
    ledger = open(os.path.join(started.run_dir, "ledger.json")).read()
    flipped = reviews.copy()
    flipped.loc[0, "label"] = "fresh" if reviews.loc[0, "label"] == "rotten" else "rotten"
    with pytest.raises(ConfigError, match="in-memory data differ from the data run"):
        fedsb_dp.resume(started.run_dir, data=flipped)
    with pytest.raises(ConfigError, match="pass the same data again"):
        fedsb_dp.resume(started.run_dir)
    assert open(os.path.join(started.run_dir, "ledger.json")).read() == ledger


@pytest.mark.parametrize(("settings", "error", "message"), [
    (dict(data=pd.DataFrame({"text": ["a b", "c d"] * 20, "y": [0, 1] * 20})), DataError,
     r"label_column='label'"),
    (dict(data=pd.DataFrame({"text": [f"t {i}" for i in range(50)], "label": [1] * 50})),
     DataError, r"label column 'label' has 1 class"),
    (dict(data=pd.DataFrame({"text": [], "label": []})), DataError, "no rows"),
    (dict(data=pd.DataFrame({"text": ["a"], "label": [0]}), dataset="x.csv"), ConfigError,
     "dataset='x.csv' and data= were both given"),
    (dict(data=pd.DataFrame({"text": ["a"], "label": [0]}), engine="flower-sim"), ConfigError,
     "flower-sim' cannot take data="),
    (dict(engine="flower"), ConfigError, r"engine='flower' is not one of"),
    (dict(epsilon=-1.0), ConfigError, r"epsilon=-1.0 must be a finite number > 0"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, settings, error, message):
    out = tmp_path / "never"
    with pytest.raises(error, match=message):
        fedsb_dp.run(**{**SMALL, "out": str(out), **settings})
    assert not out.exists()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        fedsb_dp.load_run(str(tmp_path))
    with pytest.raises(ConfigError, match="not a run directory"):
        fedsb_dp.resume(str(tmp_path))
