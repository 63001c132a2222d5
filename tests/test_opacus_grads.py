"""Opacus per-sample gradients over R only, on the real MiniLM with padded batches."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine

from fedsb_dp.adapters import (
    LayerFactors,
    SBConfig,
    find_target_modules,
    inject_adapters,
    random_orthonormal_init,
    sb_layers,
)
from fedsb_dp.losses import example_losses

TEXTS = [
    "an utterly charming and hilarious film",
    "dull",
    "the plot meanders, the acting is wooden and the ending never arrives",
    "a quiet masterpiece",
]


def _adapted_minilm(minilm, *, rank=4, dtype=torch.float64):
    model = minilm.model.to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = SBConfig(rank=rank)
    targets = find_target_modules(model, config.resolved_targets("bert"), rank=rank)
    init = random_orthonormal_init(targets, rank=rank, seed=0)
    g = torch.Generator().manual_seed(1)
    factors = {n: LayerFactors(f.B, 0.1 * torch.randn(rank, rank, generator=g), f.A)
               for n, f in init.factors.items()}
    inject_adapters(model, factors, config)
    return model.train()


def _batch(tokenizer):
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0, 0, 1])
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return batch


@pytest.mark.parametrize("force_functorch", [False, True], ids=["hooks", "functorch"])
def test_r_only_per_sample_gradients_match_autograd_loop(minilm, force_functorch):
    model = _adapted_minilm(minilm)
    batch = _batch(minilm.tokenizer)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(".R.weight") or n.startswith("classifier") for n, _ in trainable)

    expected = []
    for i in range(len(TEXTS)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        example_losses(model, one, task="sequence-classification").sum().backward()
        expected.append({n: p.grad.detach().clone() for n, p in trainable})
    model.zero_grad(set_to_none=True)

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                               force_functorch=force_functorch)
    example_losses(wrapped, batch, task="sequence-classification").sum().backward()
    for name, p in trainable:
        assert p.grad_sample.shape == (len(TEXTS), *p.shape)
        for i in range(len(TEXTS)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-9, atol=1e-12)
    # Frozen tensors get no per-sample gradient at all.
    for layer in sb_layers(model).values():
        assert getattr(layer.base_layer.weight, "grad_sample", None) is None
    wrapped._close()


def test_private_step_moves_r_only(minilm):
    model = _adapted_minilm(minilm, dtype=torch.float32)
    frozen = {n: t.detach().clone() for n, t in list(model.named_parameters())
              + list(model.named_buffers()) if not (isinstance(t, torch.nn.Parameter)
                                                   and t.requires_grad)}
    r_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = _batch(minilm.tokenizer)
    dataset = torch.utils.data.TensorDataset(batch["input_ids"], batch["attention_mask"],
                                             batch["labels"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine()
    private_model, private_opt, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False,
    )
    for ids, mask, labels in private_loader:
        loss = example_losses(private_model, {"input_ids": ids, "attention_mask": mask,
                                              "labels": labels},
                              task="sequence-classification").mean()
        loss.backward()
        private_opt.step()
        private_opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), r_before[n]), f"{n} did not move"
    now = dict(model.named_parameters()) | dict(model.named_buffers())
    for n, t in frozen.items():
        assert torch.equal(now[n], t), f"frozen tensor {n} changed"
