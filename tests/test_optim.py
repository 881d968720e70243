"""AdamW with the fused kernel: same updates as the reference implementation, used by both tasks."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.optim import adamw
from rlhf_lightning.rewards import CallableReward
from tests.ppo_helpers import tiny_config, tiny_ppo_module


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((7, 5), (5,), (3, 2, 4))]


def test_fused_adamw_matches_the_for_loop_implementation():
    runs = {}
    for fused in (True, False):
        params = _params()
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lr": 3e-2}]
        opt = adamw(groups, fused=fused, lr=1e-2, eps=1e-5)
        assert bool(opt.defaults["fused"]) is fused
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[fused] = [p.detach().clone() for p in params]
    for a, b in zip(runs[True], runs[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[True][0], _params()[0])  # the parameters did move


def test_fused_is_skipped_for_parameters_it_cannot_handle():
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))]
    assert not adamw([{"params": params}], fused=True, lr=1e-3).defaults["fused"]


@pytest.mark.parametrize("fused", [True, False])
def test_ppo_module_optimizer_follows_the_config(fused):
    module = tiny_ppo_module(tiny_config(algorithm__optimizer__fused=fused))
    optimizers, _ = module.configure_optimizers()
    assert bool(optimizers[0].defaults["fused"]) is fused


def test_ppo_clips_the_global_gradient_norm():
    from rlhf_lightning.modules.ppo import clip_gradients

    module = tiny_ppo_module(tiny_config())
    optimizer = module.configure_optimizers()[0][0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    naive = sum(p.numel() * 9.0 for p in params) ** 0.5  # every entry 3
    assert clip_gradients(module, optimizer, None) == pytest.approx(naive, rel=1e-5)
    assert clip_gradients(module, optimizer, 0.5) == pytest.approx(naive, rel=1e-5)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    torch.testing.assert_close(total, torch.tensor(0.5))


def test_ppo_under_bf16_mixed_uses_the_fused_optimizer_and_clips():
    from tests.ppo_helpers import fit

    def distinct_characters(prompts, responses):  # varies across rollouts: non-zero gradients
        return [float(len(set(r))) for r in responses]

    cfg = tiny_config(budget__num_iterations=1, algorithm__max_grad_norm=1e-3)
    module = tiny_ppo_module(cfg, reward=CallableReward(distinct_characters))
    trainer, history = fit(module, max_epochs=1, precision="bf16-mixed")
    assert trainer.optimizers[0].defaults["fused"]
    assert trainer.global_step == module.cfg.optimizer_steps_per_iteration
    assert history[-1]["optim/grad_norm"] > 1e-3  # every step was clipped, and it says so
    assert history[-1]["optim/clipped_frac"] == 1.0
