"""Shared fixtures. Everything runs offline on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _calibration_cache() -> str:
    """One σ cache per test session (shared by xdist workers and the subprocesses they start).

    Dozens of end-to-end tests calibrate the same small plans; the cache re-verifies every σ
    it serves (accounting/calibration_cache.py), and a fresh one each session keeps a planted
    calibration bug from hiding behind an earlier run's answers. The tests of the accounting
    package itself run without it (``_no_calibration_cache_for_accounting_tests``).
    """
    import tempfile

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run:
        path = os.path.join(tempfile.gettempdir(), f"fedsb-dp-calibration-{run}")
        os.makedirs(path, exist_ok=True)
        return path
    return tempfile.mkdtemp(prefix="fedsb-dp-calibration-")


os.environ.setdefault("FEDSB_DP_CALIBRATION_CACHE", _calibration_cache())

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Each xdist worker gets its share of the cores instead of all of them: two workers with
    # two intra-op threads each on two cores would only fight over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
        os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _no_calibration_cache_for_accounting_tests(request, monkeypatch):
    """tests/accounting judges calibration itself: no σ served from the session cache there."""
    if "accounting" in request.node.path.parent.parts[-1:]:
        monkeypatch.delenv("FEDSB_DP_CALIBRATION_CACHE", raising=False)


def count_calls(monkeypatch, module, name: str) -> list[dict]:
    """Wrap ``module.name`` so each call's keyword arguments are recorded; returns the record."""
    calls: list[dict] = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture(scope="session")
def rotten_tomatoes():
    from fedsb_dp.data import load_text_classification

    return load_text_classification()


@pytest.fixture()
def minilm():
    """The real default model with its [CLS] pooler (fresh per test: modified in place)."""
    from fedsb_dp.models import load_model

    return load_model(pooling="cls")


def tiny_bert(num_labels: int = 2, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)  # test-only: the model's random init
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).train()


def tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).train()


class ToyTextDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 12), generator=g)
        self.lengths = torch.randint(3, 13, (n,), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i, : self.lengths[i]], "labels": self.labels[i]}


def toy_collate(examples):
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = e["input_ids"]
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.stack([e["labels"] for e in examples])}


def assert_per_sample_gradients_match_loop(model, tokenizer, texts, labels):
    """Opacus' per-example gradients of a classifier equal one autograd pass per example.

    Dropout must be off (the loop and the batch then compute the same function).
    """
    from opacus import GradSampleModule

    from fedsb_dp.losses import example_losses

    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor(list(labels))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    example_losses(gsm, batch, task="sequence-classification").sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = [p.grad_sample.clone() for p in params]
    gsm._close()
    for p in params:
        p.grad = None
    for i in range(len(texts)):
        single = {k: v[i:i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(
            example_losses(model, single, task="sequence-classification").sum(), params)
        for g, ps in zip(grads, per_sample, strict=True):
            torch.testing.assert_close(ps[i], g, atol=1e-5, rtol=1e-4)


@pytest.fixture()
def site(tmp_path, monkeypatch):
    """A fresh directory on sys.path for fake installed packages (wheels' files)."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))  # also invalidates importlib.metadata's caches
    return path
