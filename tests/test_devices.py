"""--device and --dtype: resolution, errors, and float32 training of R under a bfloat16 base.

CI has no GPU, so the CUDA path is checked by what it must refuse and by the device each
tensor is asked for; the bfloat16 base runs for real on the offline MiniLM.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import optimizer as opacus_optimizer

from accounting import PrivacyLedger, federation_epsilon
from fedsb_dp.adapters.inject import frozen_fingerprint, sb_layers
from fedsb_dp.cli import main
from fedsb_dp.devices import resolve_device, resolve_dtype
from fedsb_dp.errors import ConfigError, SettingError
from fedsb_dp.federated.client import LocalTrainingConfig
from fedsb_dp.federated.inprocess import run_federation
from fedsb_dp.federated.run_config import RunConfig
from fedsb_dp.federated.setup import (
    inject,
    load_base_model,
    load_data,
    make_client,
    make_method,
    make_task,
    partition_frames,
)
from fedsb_dp.rng import RandomStreams

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def test_auto_resolves_to_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("text", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_the_value_and_what_exists(text):
    with pytest.raises(SettingError, match=rf"device={text!r}.*available: cpu"):
        resolve_device(text)


@pytest.mark.parametrize("text", ["gpu", "cuda:", "CUDA", "cuda:x", "mps"])
def test_malformed_device_is_a_setting_error(text):
    with pytest.raises(SettingError, match="auto, cpu, cuda or cuda:<index>"):
        RunConfig(no_dp=True, device=text)


def test_dtype_choices():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(SettingError, match="float32"):
        RunConfig(no_dp=True, dtype="float64")


def test_device_is_not_part_of_the_run_definition_but_dtype_is():
    base = RunConfig(epsilon=3.0)
    assert RunConfig(epsilon=3.0, device="cuda:3").digest() == base.digest()
    assert RunConfig(epsilon=3.0, dtype="bfloat16").digest() != base.digest()


@no_cuda
def test_cli_device_cuda_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--epsilon", "3", "--device", "cuda", "--out", str(out),
                 "--max-train-records", "60", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--device" in err and "cuda" in err and "available: cpu" in err
    assert not out.exists()


def _bf16_setup(**overrides):
    config = RunConfig(epsilon=3.0, dtype="bfloat16", max_train_records=60, clients=1,
                       batch_size=4, max_length=24, rank=4, local_steps=2,
                       init="random-orthonormal", **overrides)
    data = load_data(config)
    loaded = load_base_model(config, num_labels=data.num_labels)
    inject(config, make_method(config), loaded.model, init_seed=7)
    frames, _ = partition_frames(config, data, partition_seed=0)
    client = make_client("client-0", frames["client-0"], config, loaded.tokenizer,
                         make_task(config, data))
    return config, loaded.model, client


def test_bf16_base_trains_r_and_head_in_float32_with_float32_noise(monkeypatch):
    config, model, client = _bf16_setup()
    layer = next(iter(sb_layers(model).values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.R.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    drawn = []
    real = opacus_optimizer._generate_noise

    def recording(std, reference, generator=None, secure_mode=False):
        noise = real(std, reference, generator=generator, secure_mode=secure_mode)
        drawn.append((noise.dtype, noise.device, generator.device))
        return noise

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", recording)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    local = LocalTrainingConfig(expected_batch_size=4, local_steps=2, learning_rate=1e-3,
                                optimizer="adamw", max_grad_norm=1.0, noise_multiplier=1.0)
    start = {k: v.detach().cpu().clone() for k, v in model.named_parameters()
             if v.requires_grad}
    streams = RandomStreams(0)
    update = client.train_round(private, start, local,
                                noise_generator=streams.torch("noise", 0, 0),
                                sampling_generator=streams.torch("poisson", 0, 0))
    private._close()
    assert drawn and {d[0] for d in drawn} == {torch.float32}
    assert {d[1].type for d in drawn} == {d[2].type for d in drawn} == {"cpu"}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu"
               for v in update.state.values())
    assert any(not torch.equal(update.state[k], start[k]) for k in start)


def test_noise_generator_on_another_device_is_refused():
    config, model, client = _bf16_setup()
    local = LocalTrainingConfig(expected_batch_size=4, local_steps=1, learning_rate=1e-3,
                                optimizer="sgd", max_grad_norm=1.0, noise_multiplier=1.0)
    # No GPU here: a stand-in with a CUDA device is enough, the check runs before any draw.
    wrong = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="noise generator is on cuda:0"):
        client.train_round(model, {}, local, noise_generator=wrong,
                           sampling_generator=torch.Generator())


def test_shared_fingerprint_does_not_depend_on_the_base_dtype():
    """B and A are float32 whatever the base, hashed from CPU bytes: a data-free init agrees."""
    prints = []
    for dtype in ("float32", "bfloat16"):
        config = RunConfig(no_dp=True, dtype=dtype, rank=4, init="random-orthonormal")
        loaded = load_base_model(config, num_labels=2)
        inject(config, make_method(config), loaded.model, init_seed=3)
        prints.append(frozen_fingerprint(loaded.model))
    assert prints[0] == prints[1]


@pytest.mark.slow
def test_bf16_run_end_to_end_with_an_honest_ledger(tmp_path):
    config = RunConfig(epsilon=3.0, dtype="bfloat16", device="cpu", max_train_records=120,
                       max_eval_records=32, clients=2, rounds=1, local_steps=2, batch_size=8,
                       max_length=24, rank=4, out=str(tmp_path / "bf16"))
    result = run_federation(config, progress=False)
    assert result.status == "completed"
    saved = json.load(open(os.path.join(result.run_dir, "config.json")))
    assert saved["config"]["dtype"] == "bfloat16"
    ledger = PrivacyLedger.load(os.path.join(result.run_dir, "ledger.json"))
    eps = federation_epsilon(ledger, delta=result.summary["privacy"]["delta"],
                             accountant="prv").epsilon
    assert result.summary["privacy"]["epsilon"] == eps and 0 < eps <= 3.0
    assert {ledger.steps(c) for c in ledger.clients} == {2}


def test_sblinear_on_a_bf16_base_keeps_its_adapter_in_float32():
    from fedsb_dp.adapters.layer import SBLinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(8, 6).to(torch.bfloat16)
    layer = SBLinear(base, B=torch.randn(6, 2, generator=g), R=torch.randn(2, 2, generator=g),
                     A=torch.randn(2, 8, generator=g))
    assert layer.R.weight.dtype == layer.lora_sb_B.dtype == torch.float32
    x = torch.randn(3, 8, generator=g).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # the base's dtype flows on through the network
    y.float().sum().backward()
    assert layer.R.weight.grad.dtype == torch.float32
    # Against a float32 computation of the same layer: the adapter path lost no precision
    # beyond the bfloat16 input and output.
    reference = (base.weight.float() @ x.float().T).T + base.bias.float() + (
        layer.lora_sb_B @ layer.R.weight @ layer.lora_sb_A @ x.float().T).T
    torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.02)
