"""The shared clip helper: the same bound as Opacus' DPOptimizer, used by init and client-level."""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer

from fedsb_dp.clipping import clip_factors, joint_norms


def _per_example(generator: torch.Generator) -> list[torch.Tensor]:
    # Six examples over two tensors; scaled so that some norms are below C = 1 and some above.
    scales = torch.tensor([0.0, 0.01, 0.2, 1.0, 5.0, 40.0]).view(-1, 1, 1)
    return [scales * torch.randn(6, 3, 4, generator=generator),
            scales[:, :, 0] * torch.randn(6, 5, generator=generator)]


def test_clipped_sum_equals_opacus_clip_and_accumulate():
    grads = _per_example(torch.Generator().manual_seed(0))
    params = [torch.nn.Parameter(torch.zeros(g.shape[1:])) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad_sample = g.clone()
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=1.0, expected_batch_size=6)
    optimizer.clip_and_accumulate()
    factors = clip_factors(joint_norms(grads), 1.0)
    for p, g in zip(params, grads, strict=True):
        ours = torch.einsum("b,b...->...", factors, g)
        torch.testing.assert_close(ours, p.summed_grad, rtol=1e-6, atol=1e-7)


def test_factors_bound_every_contribution_and_leave_small_ones_alone():
    grads = _per_example(torch.Generator().manual_seed(1))
    norms = joint_norms(grads)
    factors = clip_factors(norms, 1.0)
    clipped = joint_norms([factors.view(-1, *[1] * (g.dim() - 1)) * g for g in grads])
    assert torch.all(clipped <= 1.0)
    small = norms < 1.0
    assert torch.equal(factors[small], torch.ones(int(small.sum())))  # zero norm included
    torch.testing.assert_close(clipped[~small], torch.ones(int((~small).sum())), rtol=1e-5,
                               atol=0.0)
