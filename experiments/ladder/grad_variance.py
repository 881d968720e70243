"""Variance of each preset's policy-gradient estimate at a fixed policy (the textbook claim that
rewards-to-go, baselines and advantages reduce it, measured).

For every preset: at the initial policy, draw ``--minibatches`` independent minibatches of
``--rollouts`` rollouts (fresh prompts and samples each), and compute each minibatch's gradient
of the preset's policy objective (its policy loss, plus the KL term when the KL is a loss; the
value loss and the entropy bonus left out) with respect to the policy LM's parameters, without
any optimizer step. Presets with a value model first fit it at that fixed policy
(``--value-fit-batches`` batches of value-only updates; the policy does not move), so their
baseline is a fitted one, not the zero-initialised head. Reported per preset:

- ``trace_cov``: the sum over parameters of the unbiased variance across the minibatch
  gradients, i.e. E||g - mean g||^2 (the total variance of one minibatch's estimate);
- ``signal_sq``: an unbiased estimate of ||E g||^2, ``||mean g||^2 - trace_cov / n`` (the
  squared mean of n noisy estimates overstates it by trace_cov / n), and ``noise_to_signal`` =
  trace_cov / signal_sq, which does not depend on how each preset scales its advantages (with
  few minibatches signal_sq can come out <= 0: then the signal is below what n estimates
  resolve);
- ``grad_norm_mean``: the mean of ||g||.

    python experiments/ladder/grad_variance.py --out outputs/ladder/grad_variance.json
    python experiments/ladder/grad_variance.py --policy builtin:tiny --reward token_fraction \
        --prompts tiny --rollouts 8 --minibatches 4 --out /tmp/gv.json      # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from presets import ladder_presets

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

PRESETS = ladder_presets()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--policy", default="smollm2", help="a conf/policy option")
    p.add_argument("--reward", default="vader", help="a conf/reward option")
    p.add_argument("--prompts", default="sentiment", help="a conf/data/prompts option")
    p.add_argument("--rollouts", type=int, default=16, help="rollouts per minibatch")
    p.add_argument("--minibatches", type=int, default=8, help="independent gradient estimates")
    p.add_argument("--value-fit-batches", type=int, default=6, help="value-only updates first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args(argv)


def build(preset: str, args):
    """The preset's module at the initial policy (the ladder experiment's settings)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from rlhf_lightning.cli.train import CONF_DIR
    from rlhf_lightning.config import rl_config_from
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.rewards import build_reward
    from rlhf_lightning.tasks.common import load_policy_tokenizer
    from rlhf_lightning.tasks.ppo import build_policy

    overrides = [
        "experiment=ladder",
        f"algorithm={preset}",
        f"policy={args.policy}",
        f"reward={args.reward}",
        f"data/prompts={args.prompts}",
        f"budget.rollout_batch_size={args.rollouts}",
        f"budget.minibatch_size={args.rollouts}",
        f"budget.micro_batch_size={min(8, args.rollouts)}",
        f"seed={args.seed}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/grad_variance"
    rl = rl_config_from(cfg)
    tokenizer = load_policy_tokenizer(cfg)
    from hydra.utils import instantiate

    data = instantiate(cfg.data.prompts, tokenizer=tokenizer, batch_size=rl.prompts_per_iteration)
    data.setup("fit")
    policy, ref_lm = build_policy(cfg, rl)
    module = PPOModule(
        policy,
        ref_lm,
        tokenizer,
        build_reward(instantiate(cfg.reward)),
        rl,
        seed=args.seed,
    )
    return module, data


def batches(data, count: int, seed: int):
    """``count`` prompt batches drawn without replacement (seeded)."""
    from rlhf_lightning.data.prompts import collate_prompts

    items = data.train_items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    size = data.batch_size
    for i in range(count):
        chosen = [items[j] for j in order[i * size : (i + 1) * size]]
        yield collate_prompts(chosen, data.pad_id)


def experience(module, batch, seed: int):
    from rlhf_lightning.rollout.experience import make_experience

    torch.manual_seed(seed)
    rollout = module.sample(batch, module.cfg.algorithm.samples_per_prompt)
    scores = module.score(rollout, batch, iteration=0)
    return make_experience(module.policy, module.ref_lm, rollout, scores, module.cfg)


def fit_values(module, data, args) -> None:
    """Value-only updates at the fixed policy (the warm-up loss: policy terms weighted 0)."""

    params = [p for n, p in module.policy.named_parameters() if not n.startswith("lm.")]
    optimizer = torch.optim.AdamW(params, lr=module.cfg.algorithm.value_model.lr)
    for i, batch in enumerate(batches(data, args.value_fit_batches, args.seed + 1)):
        exp = experience(module, batch, seed=10_000 + i)
        for _ in range(2):
            module.policy.zero_grad(set_to_none=True)
            module.minibatch_backward(exp, torch.arange(len(exp)), True, iteration=0)
            optimizer.step()
    module.policy.zero_grad(set_to_none=True)


def policy_objective_only(module) -> None:
    """Drop the value loss and the entropy bonus from the module's loss (the policy gradient
    alone; a KL loss term stays: it is part of the policy's objective)."""
    alg = module.cfg.algorithm
    changes = {"ent_coef": 0.0}
    if alg.value_model.present:
        changes["value_model"] = dataclasses.replace(alg.value_model, coef=0.0)
    module.cfg = dataclasses.replace(module.cfg, algorithm=dataclasses.replace(alg, **changes))


def measure(preset: str, args) -> dict:

    start = time.perf_counter()
    module, data = build(preset, args)
    if module.cfg.algorithm.value_model.present:
        fit_values(module, data, args)
    policy_objective_only(module)
    params = [p for p in module.policy.lm.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    grad_sum = torch.zeros(total, dtype=torch.float64)
    grad_sq_sum = torch.zeros(total, dtype=torch.float64)
    norms = []
    for i, batch in enumerate(batches(data, args.minibatches, args.seed + 2)):
        exp = experience(module, batch, seed=20_000 + i)
        module.policy.zero_grad(set_to_none=True)
        module.minibatch_backward(exp, torch.arange(len(exp)), False, iteration=0)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
        ).double()
        grad_sum += flat
        grad_sq_sum += flat**2
        norms.append(float(flat.norm()))
        del flat
    n = args.minibatches
    mean = grad_sum / n
    variance = (grad_sq_sum - n * mean**2) / (n - 1)
    trace_cov = float(variance.clamp(min=0).sum())
    mean_sq = float((mean**2).sum())
    signal_sq = mean_sq - trace_cov / n
    return {
        "preset": preset,
        "trace_cov": trace_cov,
        "mean_grad_sq": mean_sq,
        "signal_sq": signal_sq,
        "noise_to_signal": trace_cov / signal_sq if signal_sq > 0 else float("nan"),
        "grad_norm_mean": sum(norms) / n,
        "minibatches": n,
        "rollouts_per_minibatch": args.rollouts,
        "value_fit_batches": args.value_fit_batches if module.policy.value_head else 0,
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for preset in args.presets.split(","):
        row = measure(preset, args)
        results.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
