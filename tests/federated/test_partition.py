"""Partitions: deterministic, disjoint, complete; skew where asked; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedsb_dp.errors import ConfigError
from fedsb_dp.federated.partition import (
    MIN_LABEL_RECORDS,
    PartitionSpec,
    partition_records,
    partition_report,
    short_clients,
)

LABELS = np.array([0] * 600 + [1] * 400)[np.random.default_rng(0).permutation(1000)]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:100", "labelmix:0.3",
                                  "quantity:0.5"])
def test_disjoint_complete_deterministic(spec):
    parts = partition_records(LABELS, spec, num_clients=4, seed=11, min_records=20)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    assert all(len(p) >= 20 for p in parts)
    again = partition_records(LABELS, spec, num_clients=4, seed=11, min_records=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_records(LABELS, spec, num_clients=4, seed=12, min_records=20)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _label_spread(parts):
    fractions = [LABELS[p].mean() for p in parts]
    return max(fractions) - min(fractions)


def test_dirichlet_skews_labels_and_alpha_controls_it():
    skewed = partition_records(LABELS, "dirichlet:0.1", num_clients=5, seed=3, min_records=10)
    mild = partition_records(LABELS, "dirichlet:1000", num_clients=5, seed=3, min_records=10)
    assert _label_spread(skewed) > 0.3
    assert _label_spread(mild) < 0.1


def test_labelmix_keeps_sizes_equal_and_alpha_controls_the_label_skew():
    skewed = partition_records(LABELS, "labelmix:0.1", num_clients=6, seed=3, min_records=10)
    mild = partition_records(LABELS, "labelmix:1000", num_clients=6, seed=3, min_records=10)
    for parts in (skewed, mild):
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000
    assert _label_spread(skewed) > 0.5
    assert _label_spread(mild) < 0.12


def test_labelmix_trains_many_clients_where_a_per_label_dirichlet_cannot():
    # two labels over 30 clients at alpha 0.3 (Rotten Tomatoes' case, scaled down): splitting
    # each label among the clients leaves someone under a batch in every draw
    labels = np.repeat([0, 1], 1500)
    with pytest.raises(ConfigError, match="fewer than 32 records in every draw"):
        partition_records(labels, "dirichlet:0.3", num_clients=30, seed=0, min_records=32)
    parts = partition_records(labels, "labelmix:0.3", num_clients=30, seed=0, min_records=32)
    assert {len(p) for p in parts} == {100}
    minority = [min(np.bincount(labels[p], minlength=2)) / len(p) for p in parts]
    assert sum(m < 0.1 for m in minority) >= 5  # strongly skewed clients, as asked
    assert sorted(np.concatenate(parts).tolist()) == list(range(3000))


def test_labelmix_reads_labels_that_are_not_0_to_k():
    labels = np.repeat([3, 7, 11], 200)
    parts = partition_records(labels, "labelmix:0.2", num_clients=4, seed=1, min_records=8)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))
    shares = [np.mean(labels[p] == 3) for p in parts]
    assert max(shares) - min(shares) > 0.3


def test_labelmix_takes_the_label_floor():
    labels = np.repeat(np.arange(4), 150)
    details = {}
    parts = partition_records(labels, "labelmix:0.1:2", num_clients=3, seed=0, min_records=8,
                              details=details)
    assert short_clients(labels, parts, min_labels=2) == []
    assert details["label_floor"]["min_labels"] == 2


def test_quantity_skews_sizes_not_labels():
    parts = partition_records(LABELS, "quantity:0.3", num_clients=5, seed=5, min_records=10)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0]
    big = [p for p in parts if len(p) > 100]
    assert all(abs(LABELS[p].mean() - 0.4) < 0.12 for p in big)


def test_report_has_sizes_and_histograms():
    parts = partition_records(LABELS, "dirichlet:0.5", num_clients=3, seed=0, min_records=10)
    report = partition_report(LABELS, parts, ("neg", "pos"))
    assert set(report) == {"client-0", "client-1", "client-2"}
    assert sum(r["records"] for r in report.values()) == 1000
    assert sum(r["labels"]["pos"] for r in report.values()) == 400


@pytest.mark.parametrize("spec, match", [
    ("dirichlet:0", "alpha=0.0 must be > 0"),
    ("dirichlet:-1", "alpha=-1.0 must be > 0"),
    ("dirichlet", "needs a number"),
    ("quantity:abc", "needs a number"),
    ("pathological:2", "kind 'pathological' is not one of"),
    ("iid:3", "takes no parameter"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        PartitionSpec.parse(spec)


def test_a_client_left_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="fewer than 300 records"):
        partition_records(LABELS, "dirichlet:0.05", num_clients=3, seed=0, min_records=300)
    with pytest.raises(ConfigError, match="exceeds the 1000 training records"):
        partition_records(LABELS, "iid", num_clients=3, seed=0, min_records=400)


def _first_degenerate_seed(labels, spec, clients, min_labels):
    for seed in range(50):
        parts = partition_records(labels, spec, num_clients=clients, seed=seed, min_records=8)
        if short_clients(labels, parts, min_labels=min_labels):
            return seed, parts
    raise AssertionError("no degenerate draw among 50 seeds")


def test_a_label_floor_redraws_degenerate_dirichlet_splits():
    labels = np.repeat(np.arange(4), 150)
    seed, plain = _first_degenerate_seed(labels, "dirichlet:0.1", 3, min_labels=2)
    details = {}
    parts = partition_records(labels, "dirichlet:0.1:2", num_clients=3, seed=seed,
                              min_records=8, details=details)
    assert short_clients(labels, parts, min_labels=2) == []
    for part in parts:  # every client: ≥ 2 labels with ≥ MIN_LABEL_RECORDS records
        counts = np.bincount(labels[part], minlength=4)
        assert (counts >= MIN_LABEL_RECORDS).sum() >= 2
    assert details["redraws"] >= 1
    assert details["label_floor"] == {"min_labels": 2, "min_records_per_label": 10}
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    again = partition_records(labels, "dirichlet:0.1:2", num_clients=3, seed=seed, min_records=8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, plain, strict=True))


def test_a_draw_meeting_the_floor_is_the_plain_split():
    labels = np.repeat(np.arange(4), 150)
    details = {}
    plain = partition_records(labels, "dirichlet:5", num_clients=3, seed=1, min_records=8)
    floored = partition_records(labels, "dirichlet:5:2", num_clients=3, seed=1, min_records=8,
                                details=details)
    assert details["redraws"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(plain, floored, strict=True))


@pytest.mark.parametrize("spec, match", [
    ("dirichlet:0.3:0", "integer ≥ 1"), ("dirichlet:0.3:x", "integer ≥ 1"),
    ("quantity:0.5:2", "label floor"), ("iid:2", "takes no parameter"),
    ("labelmix:0", "alpha=0.0 must be > 0"), ("labelmix:0.3:0", "integer ≥ 1"),
])
def test_bad_label_floors(spec, match):
    with pytest.raises(ConfigError, match=match):
        PartitionSpec.parse(spec)


def test_an_unreachable_floor_is_a_clear_error():
    labels = np.repeat(np.arange(3), 100)
    with pytest.raises(ConfigError, match="exceeds the 3 labels"):
        partition_records(labels, "dirichlet:0.3:4", num_clients=2, seed=0, min_records=8)
    assert str(PartitionSpec.parse("dirichlet:0.30:2")) == "dirichlet:0.3:2"
    assert str(PartitionSpec.parse("labelmix:0.30")) == "labelmix:0.3"


def test_labelmix_with_a_vanishing_alpha_is_a_clear_error_not_nan():
    # at alpha 1e-6 every client's mix is one label; two clients on one label exhaust it
    labels = np.repeat(np.arange(3), 10)
    messages = []
    for seed in range(20):
        try:
            partition_records(labels, "labelmix:0.000001", num_clients=3, seed=seed)
        except ConfigError as exc:
            messages.append(str(exc))
    assert messages, "no seed drew two clients onto one label"
    assert all("labels all ran out before it was full" in m and "raise alpha" in m
               for m in messages)
