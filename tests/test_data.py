"""Offline default data, splits and loaders."""

from __future__ import annotations

import pandas as pd
import pytest

from fedsb_dp.data import (
    TokenizedDataset,
    load_text_classification,
    make_collate,
)
from fedsb_dp.errors import DataError


def test_rotten_tomatoes_default(rotten_tomatoes):
    data = rotten_tomatoes
    assert data.label_names == ("rotten", "fresh")
    sizes = len(data.train), len(data.validation), len(data.test)
    total = sum(sizes)
    # 12,808 fresh/rotten rows minus missing/duplicates; plot rows are gone.
    assert 12_600 < total <= 12_808
    assert 0.07 < sizes[1] / total < 0.13 and 0.07 < sizes[2] / total < 0.13
    assert set(data.train["label"].unique()) == {0, 1}
    keys = [set(s["text"].str.strip().str.lower()) for s in (data.train, data.validation,
                                                             data.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert data.dropped["duplicates"] > 0


def test_splits_are_deterministic_and_order_independent(tmp_path):
    frame = pd.DataFrame({"sentence": [f"text number {i}" for i in range(300)],
                          "y": ["pos", "neg", "neu"] * 100})
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    shuffled = tmp_path / "s.csv"
    frame.sample(frac=1.0, random_state=1).to_csv(shuffled, index=False)
    a = load_text_classification(str(path), text_column="sentence", label_column="y")
    b = load_text_classification(str(shuffled), text_column="sentence", label_column="y")
    assert set(a.test["text"]) == set(b.test["text"])
    assert a.label_names == ("neg", "neu", "pos")
    c = load_text_classification(str(path), text_column="sentence", label_column="y",
                                 split_seed=7)
    assert set(a.test["text"]) != set(c.test["text"])


def test_duplicates_and_conflicts_removed(tmp_path):
    frame = pd.DataFrame({
        "text": ["Same text", "same  TEXT", "clash", "clash"] + [f"x{i}" for i in range(40)],
        "label": [1, 1, 0, 1] + [i % 2 for i in range(40)],
    })
    path = tmp_path / "d.jsonl"
    frame.to_json(path, orient="records", lines=True)
    data = load_text_classification(str(path))
    all_text = pd.concat([data.train, data.validation, data.test])["text"].tolist()
    assert "clash" not in all_text
    assert sum(t.lower().split() == ["same", "text"] for t in all_text) == 1
    assert data.dropped == {"missing": 0, "conflicting_labels": 2, "duplicates": 1}


def test_text_pair_columns(tmp_path):
    frame = pd.DataFrame({"premise": [f"p{i}" for i in range(60)],
                          "hypothesis": [f"h{i}" for i in range(60)],
                          "label": [0, 1, 2] * 20})
    path = tmp_path / "nli.parquet"
    frame.to_parquet(path)
    data = load_text_classification(str(path), text_column="premise",
                                    text_pair_column="hypothesis")
    assert data.has_pair and data.num_labels == 3


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_classification(str(tmp_path / "missing.csv"))
    frame = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"text_column='sentence' is not a column of the "
                       r"dataset; its columns: \['text', 'label'\]"):
        load_text_classification(str(tmp_path / "d.csv"), text_column="sentence")
    with pytest.raises(DataError, match="validation_fraction=1.5"):
        load_text_classification(validation_fraction=1.5)
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="extension '.xlsx'"):
        load_text_classification(str(tmp_path / "d.xlsx"))


def test_unknown_label_in_test_split(tmp_path):
    from fedsb_dp.data import _unit_hash

    candidates = pd.Series([f"odd one {i}" for i in range(100)])
    in_test = candidates[_unit_hash(candidates, 0) < 0.1].iloc[0]
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(50)] + [in_test],
                          "label": ["a", "b"] * 25 + ["c"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"label value\(s\) \['c'\]"):
        load_text_classification(str(tmp_path / "d.csv"))


def test_tokenized_batches_pad_to_longest(minilm, rotten_tomatoes):
    dataset = TokenizedDataset(rotten_tomatoes.train.head(8), minilm.tokenizer, max_length=32)
    batch = make_collate(minilm.tokenizer)([dataset[i] for i in range(8)])
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 32
    assert batch["labels"].tolist() == rotten_tomatoes.train.head(8)["label"].tolist()
    assert (batch["attention_mask"].sum(1) == batch["attention_mask"].sum(1)).all()


# ---------------------------------------------------------------- in-memory data
def _reviews(n: int = 200) -> pd.DataFrame:
    from fedsb_dp.data import load_rotten_tomatoes

    return load_rotten_tomatoes().head(n)


def test_in_memory_frame_equals_the_same_rows_in_a_file(tmp_path):
    frame = _reviews()
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    from_file = load_text_classification(str(path))
    in_memory = load_text_classification(frame)
    for split in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(getattr(in_memory, split), getattr(from_file, split))
    assert in_memory.label_names == from_file.label_names
    assert in_memory.digest == from_file.digest and in_memory.source == "<in-memory>"


def test_datasets_objects_load_like_frames():
    import datasets

    frame = _reviews()
    as_frame = load_text_classification(frame)
    as_dataset = load_text_classification(datasets.Dataset.from_pandas(frame,
                                                                       preserve_index=False))
    pd.testing.assert_frame_equal(as_dataset.train, as_frame.train)
    assert as_dataset.digest == as_frame.digest
    # Given splits are kept as they are; only the pool is hash-split.
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_pandas(frame.iloc[:150], preserve_index=False),
        "validation": datasets.Dataset.from_pandas(frame.iloc[150:175], preserve_index=False),
        "test": datasets.Dataset.from_pandas(frame.iloc[175:], preserve_index=False)})
    split = load_text_classification(dd)
    assert set(split.test["text"]) <= set(frame.iloc[175:]["text"])
    assert len(split.train) == len(frame.iloc[:150].drop_duplicates("text"))


def test_digest_follows_rows_order_and_label_type():
    frame = _reviews()
    digest = load_text_classification(frame).digest
    assert load_text_classification(frame.copy()).digest == digest
    assert load_text_classification(frame.iloc[::-1]).digest != digest
    flipped = frame.copy()
    flipped.iloc[0, flipped.columns.get_loc("label")] = (
        "fresh" if frame["label"].iloc[0] == "rotten" else "rotten")
    assert load_text_classification(flipped).digest != digest
    # Extra columns are not part of what is trained on.
    assert load_text_classification(frame.assign(note="x")).digest == digest


@pytest.mark.parametrize(("data", "message"), [
    (pd.DataFrame({"text": ["a b", "c d"] * 20, "y": [0, 1] * 20}),
     r"label_column='label' is not a column of the dataset"),
    (pd.DataFrame({"text": [f"text {i}" for i in range(50)], "label": ["pos"] * 50}),
     r"label column 'label' has 1 class\(es\) \['pos'\]"),
    (pd.DataFrame({"text": [], "label": []}), r"in-memory dataset has no rows"),
    ({"train": pd.DataFrame({"text": [], "label": []})}, r"split 'train' has no rows"),
    ({}, "no splits"),
    ([("a", 0)], "list is not supported"),
])
def test_bad_in_memory_data_names_the_problem(data, message):
    with pytest.raises(DataError, match=message):
        load_text_classification(data)


def test_capped_evaluation_samples_by_hash_not_by_file_order():
    """A split sorted by label (20 Newsgroups' test file is) must not be cut to its first
    class: the hashed cap keeps a sample that ignores the order and is the same every time."""
    import pandas as pd

    from fedsb_dp.data import cap_records

    frame = pd.DataFrame({"text": [f"post {i} about topic {i // 100}" for i in range(1000)],
                          "label": [i // 100 for i in range(1000)]})
    assert set(cap_records(frame, 200, rule="head")["label"]) == {0, 1}
    sample = cap_records(frame, 200)
    assert len(sample) == 200 and sample["label"].nunique() == 10
    assert sample["label"].value_counts().max() < 40
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert set(cap_records(shuffled, 200)["text"]) == set(sample["text"])
    assert cap_records(frame, None) is frame and len(cap_records(frame, 5000)) == 1000
    with pytest.raises(DataError, match="eval_sample='first'"):
        cap_records(frame, 10, rule="first")


def test_saved_runs_without_the_setting_keep_their_first_records_rule():
    from fedsb_dp.federated.run_config import RunConfig
    from fedsb_dp.federated.run_dir import saved_settings

    old = RunConfig(no_dp=True).to_dict()
    del old["eval_sample"]
    assert RunConfig.from_dict(saved_settings(old)).eval_sample == "head"
    assert RunConfig(no_dp=True).eval_sample == "hashed"
    assert RunConfig.from_dict(saved_settings(RunConfig(no_dp=True).to_dict())).eval_sample == (
        "hashed")
