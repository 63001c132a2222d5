"""Bring your own data: hub configs and splits, saved datasets, natural partitions, errors."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest

from fedsb_dp.data import load_text_classification
from fedsb_dp.errors import ConfigError, DataError, SettingError
from fedsb_dp.federated.partition import PartitionSpec, natural_partition
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.setup import load_data, partition_frames


def _reviews(n: int, offset: int = 0, label: int | None = None) -> dict[str, list]:
    return {"sentence": [f"review number {i} says {'good' if i % 2 else 'bad'}"
                         for i in range(offset, offset + n)],
            "label": [label if label is not None else i % 2 for i in range(offset, offset + n)]}


def _glue_like() -> datasets.DatasetDict:
    """GLUE's layout: labelled train and validation, a test split whose labels are -1."""
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_reviews(200)),
        "validation": datasets.Dataset.from_dict(_reviews(30, offset=1000)),
        "test": datasets.Dataset.from_dict(_reviews(30, offset=2000, label=-1)),
    })


def test_hub_config_and_splits_reach_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return _glue_like()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = RunConfig(no_dp=True, dataset="nyu-mll/glue", dataset_config="sst2",
                       text_column="sentence", train_split="train",
                       validation_split="validation")
    data = load_data(config)
    assert calls == [("nyu-mll/glue", "sst2", {})]
    assert len(data.validation) == 30  # the hub's own validation split, whole
    # GLUE's test has no labels: test records are hashed from train, and the record says so
    assert data.splits["test"].startswith("hashed from the training pool: split 'test'")
    assert len(data.train) + len(data.test) == 200
    with pytest.raises(DataError, match=r"test_split='test' has no labelled records"):
        load_data(RunConfig(no_dp=True, dataset="nyu-mll/glue", text_column="sentence",
                            test_split="test"))
    with pytest.raises(DataError, match=r"train_split='training' is not a split of "
                                        r"'nyu-mll/glue'; its splits: \['test', 'train', "):
        load_data(RunConfig(no_dp=True, dataset="nyu-mll/glue", text_column="sentence",
                            train_split="training"))


def test_saved_dataset_directory_loads_like_the_hub(tmp_path, monkeypatch):
    _glue_like().save_to_disk(str(tmp_path / "glue"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _glue_like())
    from_disk = load_text_classification(str(tmp_path / "glue"), text_column="sentence")
    from_hub = load_text_classification("nyu-mll/glue", text_column="sentence")
    assert from_disk.digest == from_hub.digest
    pd.testing.assert_frame_equal(from_disk.train, from_hub.train)
    assert from_disk.splits == {"train": "train", "validation": "validation",
                                "test": from_hub.splits["test"]}


def test_directory_of_parquet_files_with_named_splits(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    pd.DataFrame(_reviews(120)).to_parquet(folder / "train.parquet")
    pd.DataFrame(_reviews(20, offset=500)).to_parquet(folder / "test.parquet")
    data = load_text_classification(str(folder), text_column="sentence", train_split="train",
                                    test_split="test")
    assert len(data.test) == 20 and data.splits["test"] == "test"
    assert data.splits["validation"] == "hashed from the training pool"


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"dataset='no-such-org/no-such-data' is not a local "
                                        r"file or directory, and HF_HUB_OFFLINE=1 forbids"):
        load_text_classification("no-such-org/no-such-data")


def _sites(tmp_path, counts: dict[str, int]) -> str:
    rows = []
    for site, count in counts.items():
        rows += [{"text": f"{site} note {i} about case {i % 7}", "label": ["no", "yes"][i % 2],
                  "site": site} for i in range(count)]
    path = tmp_path / "sites.csv"
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return str(path)


def test_natural_partition_one_client_per_value(tmp_path):
    path = _sites(tmp_path, {"north": 60, "south": 90, "east": 75})
    config = RunConfig(no_dp=True, dataset=path, partition="column:site", clients=3,
                       batch_size=8)
    data = load_data(config)
    frames, report = partition_frames(config, data, partition_seed=0)
    # clients named by index in the sorted order of the values; the values stay in the report
    assert [report["clients"][c]["value"] for c in frames] == ["east", "north", "south"]
    for cid, frame in frames.items():
        assert set(frame["group"]) == {report["clients"][cid]["value"]}
    assert sum(len(f) for f in frames.values()) == len(data.train)
    with pytest.raises(SettingError, match=r"clients=4 differs from the 3 distinct values of "
                                           r"column 'site'.*set --clients 3"):
        partition_frames(RunConfig(no_dp=True, dataset=path, partition="column:site",
                                   clients=4, batch_size=8), data, partition_seed=0)


def test_natural_partition_refusals(tmp_path):
    path = _sites(tmp_path, {"north": 60, "tiny-clinic": 5})
    config = RunConfig(no_dp=True, dataset=path, partition="column:site", clients=2,
                       batch_size=8)
    with pytest.raises(ConfigError, match=r"value\(s\) 'tiny-clinic' \(\d\) of the partition "
                                          r"column hold fewer than 8 training records"):
        partition_frames(config, load_data(config), partition_seed=0)
    with pytest.raises(DataError, match=r"partition='column:hospital' names column "
                                        r"'hospital', which the dataset lacks"):
        load_data(RunConfig(no_dp=True, dataset=path, partition="column:hospital"))
    many = pd.Series(np.arange(1001))
    with pytest.raises(ConfigError, match="1001 distinct values, more than 1000 clients"):
        natural_partition(many, min_records=1)
    with pytest.raises(ConfigError, match="column needs a column name"):
        PartitionSpec.parse("column:")


@pytest.mark.parametrize("skew", ["dirichlet:0.3", "labelmix:0.3"])
def test_label_skews_refused_on_free_form_text(skew):
    with pytest.raises(SettingError, match=rf"partition='{skew}' skews labels, and "
                                           r"free-form text has none"):
        RunConfig(no_dp=True, task="causal-lm", response_column="text", partition=skew)
    RunConfig(no_dp=True, task="causal-lm", partition="dirichlet:0.3")  # label task: fine


@pytest.mark.parametrize(("labels", "message"), [
    ([[0, 1]] * 40, r"label_column='label' holds list values"),
    ([0.25, 1.5] * 20, r"label_column='label' holds fractional numbers \(e.g. 0.25\)"),
])
def test_labels_that_are_not_classes_are_refused(labels, message):
    frame = pd.DataFrame({"text": [f"t {i}" for i in range(40)], "label": labels})
    with pytest.raises(DataError, match=message):
        load_text_classification(frame)


def test_data_record_names_config_and_splits(monkeypatch):
    from fedsb_dp.federated.data_record import data_record

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _glue_like())
    config = RunConfig(no_dp=True, dataset="nyu-mll/glue", dataset_config="sst2",
                       text_column="sentence")
    record = data_record(load_data(config), config.dataset_config)
    assert record["dataset_config"] == "sst2"
    assert record["splits"]["validation"] == "validation"
    assert "has no labelled records" in record["splits"]["test"]
    json.dumps(record)


def test_without_a_train_split_setting_only_the_train_split_trains(caplog):
    """Extra splits (MNLI's validation_mismatched, IMDB's unsupervised) are not pooled into
    training when the source has a split named train; without one, the splits are pooled."""
    splits = {"train": pd.DataFrame(_reviews(150)),
              "validation_mismatched": pd.DataFrame(_reviews(40, offset=900))}
    with caplog.at_level("WARNING", logger="fedsb_dp.data"):
        data = load_text_classification(splits, text_column="sentence")
    assert "['validation_mismatched'] are not used" in caplog.text
    assert len(data.train) + len(data.validation) + len(data.test) == 150
    assert not data.train["text"].str.contains("review number 9[0-9][0-9] ").any()
    pooled = load_text_classification({"part1": pd.DataFrame(_reviews(150)),
                                       "part2": pd.DataFrame(_reviews(40, offset=900))},
                                      text_column="sentence")
    assert len(pooled.train) + len(pooled.validation) + len(pooled.test) == 190


def test_in_memory_dict_of_splits_takes_the_split_settings():
    splits = {"train": pd.DataFrame(_reviews(150)),
              "holdout": pd.DataFrame(_reviews(20, offset=700)),
              "extra": pd.DataFrame(_reviews(40, offset=900))}
    data = load_text_classification(splits, text_column="sentence", train_split="train",
                                    test_split="holdout")
    assert len(data.test) == 20 and data.splits["test"] == "holdout"
    # "extra" is neither trained on nor evaluated: only the named training split is pooled
    assert not data.train["text"].str.contains("review number 9[0-9][0-9] ").any()
    assert len(data.train) + len(data.validation) == 150
