"""Initialisation privacy in the engine: the sampled DP init's charge, the public-data init,
and the audit of both (real MiniLM, real Opacus, a few hundred records)."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from accounting import GaussianDpEvent, PoissonSampledDpEvent, PrivacyLedger
from accounting.audit import audit_run
from accounting.events import event_from_dict
from fedsb_dp.cli import main as cli_main
from fedsb_dp.errors import ConfigError
from fedsb_dp.federated import inprocess as engine
from fedsb_dp.federated.initialisation import PUBLIC_KEY, init_events
from fedsb_dp.federated.run_config import RunConfig

SMALL = dict(max_train_records=80, max_eval_records=16, clients=2, rounds=1, local_steps=1,
             batch_size=8, max_length=16, rank=4, epsilon=3.0, targets=("query",))
DP_INIT = dict(init="gradient-svd", init_source="dp", init_examples=8,
               init_noise_multiplier=8.0)


def _init_entries(ledger: PrivacyLedger) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {cid: [] for cid in ledger.clients}
    for entry in ledger.to_json_dict()["body"]["entries"]:
        if entry["kind"] == "init":
            out[entry["client"]].append(entry)
    return out


def _check(report, name):
    return next(c for c in report.checks if c[0] == name)


def test_init_events_use_each_clients_own_rate():
    config = RunConfig(epsilon=3.0, **DP_INIT)
    events = init_events(config, {"client-0": 100, "client-1": 400})
    # No min over clients: a client's charge depends on its own size only.
    assert events == {
        "client-0": PoissonSampledDpEvent(8 / 100, GaussianDpEvent(8.0)),
        "client-1": PoissonSampledDpEvent(8 / 400, GaussianDpEvent(8.0)),
    }
    assert init_events(RunConfig(epsilon=3.0), {"client-0": 100}) == {}  # W0-SVD: data-free


@pytest.mark.parametrize("privacy", [{}, {"epsilon": None, "no_dp": True}])
def test_q_init_above_one_fails_before_spending(tmp_path, privacy):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"init_examples=64 exceeds the 40 records of "
                                          r"client-\d.*--init-examples"):
        engine.run_federation(RunConfig(**{**SMALL, **DP_INIT, "init_examples": 64,
                                           "out": str(out), **privacy}), progress=False)
    assert not out.exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"init": "gradient-svd", "init_source": "public"}, "needs --init-data"),
    ({"init": "gradient-svd", "init_source": "public", "init_data": "rotten-tomatoes"},
     "is the training dataset itself"),
    ({"init_data": "public.csv"}, "only read by --init gradient-svd --init-source public"),
    ({"dp_level": "client", "init": "gradient-svd"}, "--init-source public --init-data"),
])
def test_init_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(epsilon=3.0, **overrides)


def test_cli_public_init_without_data_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["run", "--epsilon", "3", "--init", "gradient-svd", "--init-source",
                     "public", "--out", str(out)])
    assert code == 2 and "--init-data" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_dp_init_run_is_charged_sampled_and_audits_clean(tmp_path):
    config = RunConfig(**{**SMALL, **DP_INIT, "out": str(tmp_path / "run")})
    result = engine.run_federation(config, progress=False)
    assert result.status == "completed"
    ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
    for cid, entries in _init_entries(ledger).items():
        assert len(entries) == 1 and entries[0]["count"] == 1
        assert entries[0]["event"] == PoissonSampledDpEvent(
            8 / ledger.dataset_sizes[cid], GaussianDpEvent(8.0)).to_dict()
    assert ledger.metadata["init"]["sampling"] == "poisson"
    assert result.summary["privacy"]["epsilon"] <= 3.0  # calibrated with the init included
    report = audit_run(result.run_dir)
    assert report.passed, report.format()

    # The same run as the pre-fix code charged it: one unsampled Gaussian per client.
    old = tmp_path / "old"
    shutil.copytree(result.run_dir, old)
    body = ledger.to_json_dict()["body"]
    rewritten = PrivacyLedger(unit=body["unit"], dataset_sizes=body["dataset_sizes"],
                              target_epsilon=body["target_epsilon"],
                              target_delta=body["target_delta"], metadata=body["metadata"])
    for cid in ledger.clients:
        rewritten.record(cid, GaussianDpEvent(8.0), kind="init")
    for entry in body["entries"]:
        if entry["kind"] != "init":
            rewritten.record(entry["client"], event_from_dict(entry["event"]),
                             count=entry["count"], round_index=entry["rounds"][0])
    os.remove(old / "ledger.json")
    rewritten.save(str(old / "ledger.json"))
    _, ok, detail = _check(audit_run(str(old)), "init matches the ledger")
    assert not ok and "OLD unsampled charge" in detail


def test_public_init_reads_only_the_public_data(tmp_path, monkeypatch):
    public = tmp_path / "public.csv"
    rows = [f"{'a fine' if i % 2 else 'a dull'} public sentence number {i},"
            f"{'fresh' if i % 2 else 'rotten'}" for i in range(30)]
    public.write_text("sentence,verdict\n" + "\n".join(rows) + "\n")
    seen = {}
    real = engine.gradient_svd_init

    def spy(model, targets, datasets, *args, **kwargs):
        seen["datasets"] = dict(datasets)
        return real(model, targets, datasets, *args, **kwargs)

    monkeypatch.setattr(engine, "gradient_svd_init", spy)
    # Non-private training (no calibration to pay for): what matters here is what the init
    # reads; the audit of a private public-init run is tested torch-free.
    config = RunConfig(**{**SMALL, "epsilon": None, "no_dp": True, "init": "gradient-svd",
                          "init_source": "public", "init_examples": 20, "init_data": str(public),
                          "init_text_column": "sentence", "init_label_column": "verdict",
                          "out": str(tmp_path / "run")})
    result = engine.run_federation(config, progress=False)
    assert result.status == "completed"
    assert list(seen["datasets"]) == [PUBLIC_KEY]
    assert len(seen["datasets"][PUBLIC_KEY]) == 20  # n_init public records, no client's
    ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
    assert all(not e for e in _init_entries(ledger).values())  # public data: no charge
    reference = ledger.metadata["init"]["data"]
    assert reference["source"] == str(public) and reference["records"] == 20
    assert reference["file_sha256"] == hashlib.sha256(public.read_bytes()).hexdigest()
    assert _check(audit_run(result.run_dir), "init matches the ledger")[1]
