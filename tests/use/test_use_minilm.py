"""Using a finished run of the real default model (mean-pooled MiniLM): every README command.

One tiny real run per module (1 round, 1 local step, 60 records, real Opacus and accountant);
the exports are reloaded with PEFT/transformers alone and must give the run's own logits.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from readme_blocks import commands, run_python

import fedsb_dp
from fedsb_dp.cli import main
from fedsb_dp.use.export import load_sb_export

pytestmark = pytest.mark.slow  # a real MiniLM run (~30 s on 2 cores)

SMALL = dict(epsilon=3.0, seed=5, clients=2, rounds=1, local_steps=1, batch_size=4,
             max_length=16, rank=2, max_train_records=60, max_eval_records=8,
             accountant="rdp", init="random-orthonormal", learning_rate=0.3)
TEXTS = ["a gripping film", "dull and overlong", "an утомительный mess of a movie, " * 8]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fedsb_dp.run(out=str(tmp_path_factory.mktemp("use") / "reviews"), **SMALL)


def _own_logits(loaded, texts, max_length=None):
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


def _mean_logits(encoder, head, tokenizer, texts):
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]


def test_readme_commands_export_reload_and_predict(run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    csv = tmp_path / "reviews.csv"
    pd.DataFrame({"review": TEXTS, "other": [1, 2, 3]}).to_csv(csv, index=False)
    paths = {name: str(tmp_path / name) for name in ("my-model", "my-merged", "my-sb",
                                                     "preds.csv")}
    for argv in commands("use-classifier", {"runs/reviews": run.path,
                                            "reviews.csv": str(csv), **paths}):
        assert main(argv) == 0, argv

    own = run.load_model()
    expected = _own_logits(own, TEXTS)
    assert run.config.pooling == "auto" and own.model.bert.pooler.__class__.__name__ == (
        "MaskedMeanPooler")
    # PEFT: the README's own loader, run as printed.
    namespace = run_python("use-mean-loader", {"my-model": paths["my-model"]})
    torch.testing.assert_close(namespace["logits"], expected[:1], atol=1e-5, rtol=1e-5)
    # Merged: the encoder loads as a plain AutoModel; same head, same pooling.
    merged = AutoModel.from_pretrained(paths["my-merged"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["my-merged"])
    head = load_file(f"{paths['my-merged']}/head.safetensors")
    torch.testing.assert_close(_mean_logits(merged, head, tokenizer, TEXTS), expected,
                               atol=1e-5, rtol=1e-5)
    # The trained model is not the base: the merged weights differ from the pretrained ones.
    base = AutoModel.from_pretrained(own.resolved_path)
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    # sb: fedsb-dp's own adapter on a fresh base.
    torch.testing.assert_close(_own_logits(load_sb_export(paths["my-sb"]), TEXTS), expected,
                               atol=1e-6, rtol=1e-6)
    for name in ("my-model", "my-merged", "my-sb"):
        record = json.loads((tmp_path / name / "export.json").read_text())
        assert record["epsilon"] == run.epsilon() and 0 < record["epsilon"] <= 3.0
        assert record["delta"] == run.privacy().delta and record["method"] == "fedsb"
        assert record["pooling"] == "mean" and record["label_names"] == run.label_names
        assert record["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"

    # predict on the CSV: truncated to the run's max_length, as training and evaluation were.
    preds = pd.read_csv(paths["preds.csv"])
    probs = torch.softmax(_own_logits(own, TEXTS, run.config.max_length).double(), -1)
    assert list(preds["text"]) == TEXTS
    assert list(preds["label"]) == [run.label_names[i] for i in probs.argmax(-1)]
    columns = [f"p_{name}" for name in run.label_names]
    torch.testing.assert_close(torch.tensor(preds[columns].to_numpy()), probs)
    assert preds["probability"].tolist() == pytest.approx(probs.max(-1).values.tolist())
    pd.testing.assert_frame_equal(run.predict(TEXTS), preds, check_exact=False)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    words = ["rain", "sun", "snow", "wind", "fog", "heat"]
    rows = [{"premise": f"the day brought {words[i % 6]} and then {words[(i + 1) % 6]} {i}",
             "hypothesis": f"there was {words[(i + i % 2) % 6]}", "label": i % 2}
            for i in range(80)]
    return fedsb_dp.run(out=str(tmp_path_factory.mktemp("use") / "pairs"),
                        data=pd.DataFrame(rows), text_column="premise",
                        text_pair_column="hypothesis", **SMALL)


def test_a_text_pair_run_predicts_from_both_texts(pair_run, run, tmp_path, capsys):
    premises = ["the day brought rain and then sun", "the day brought fog and then heat"]
    hypotheses = ["there was rain", "there was snow"]
    with pytest.raises(fedsb_dp.ConfigError, match="classifies text pairs"):
        pair_run.predict(premises)
    with pytest.raises(fedsb_dp.ConfigError, match="2 text.s. but 1"):
        pair_run.predict(premises, pairs=hypotheses[:1])
    with pytest.raises(fedsb_dp.ConfigError, match="classifies single texts"):
        run.predict(premises, pairs=hypotheses)
    frame = pair_run.predict(premises, pairs=hypotheses)
    loaded = pair_run.load_model()
    batch = loaded.tokenizer(premises, hypotheses, padding=True, truncation=True,
                             max_length=SMALL["max_length"], return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(loaded.model(**batch).logits.double(), dim=-1)
    names = [loaded.model.config.id2label[i] for i in range(2)]
    got = torch.tensor(frame[[f"p_{n}" for n in names]].to_numpy())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert list(frame["text_pair"]) == hypotheses
    # The CLI reads both columns of a file by the run's column names.
    table = tmp_path / "pairs.csv"
    pd.DataFrame({"premise": premises, "hypothesis": hypotheses}).to_csv(table, index=False)
    assert main(["predict", pair_run.path, "--input", str(table), "--output",
                 str(tmp_path / "out.csv")]) == 0
    cli = pd.read_csv(tmp_path / "out.csv")
    torch.testing.assert_close(torch.tensor(cli[[f"p_{n}" for n in names]].to_numpy()),
                               expected, rtol=0, atol=1e-9)
