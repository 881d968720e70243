"""The estimator audit: what every preset and KL option estimates, computed exactly.

    PYTHONPATH=. python experiments/estimator_audit/audit.py --out outputs/estimator_audit

Each row composes a config from ``conf/`` (a preset plus overrides), runs it through
:func:`tabular.expected_update` on a tabular problem and compares the exact expected update
with a target gradient (:func:`tabular.compare`). Writes ``results.json`` and ``tables.md`` to
``--out``; ``experiments/estimator_audit/README.md`` holds the tables and what they show.

The tables:

- ``estimators``: each advantage estimator (and whitening, and each aggregation) alone: the sum
  aggregation (``seq_mean_token_sum`` with normalizer 1, the Monte Carlo mean of per-sequence
  sums), k1 in the reward, on-policy, against ``grad J``;
- ``presets``: every preset of ``conf/algorithm/`` as configured (its aggregation, whitening,
  KL placement and estimator), on-policy and after the policy moved, against ``grad J``;
- ``off_policy``: the policy losses on stale samples (beta 0, so the only staleness is the
  policy's), a one-token horizon and a three-token one;
- ``kl``: every KL estimator x placement with the reward at 0, against ``-beta grad KL`` (the
  sequence-level KL) and against the per-state target (state distribution held fixed).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from experiments.estimator_audit.tabular import (
    TabularProblem,
    ascent_steps,
    audit_config,
    compare,
    expected_update,
    objective_gradient,
    per_state_kl_gradient,
    random_problem,
    true_values,
)

PRESETS = (
    "reinforce",
    "reinforce_rtg",
    "reinforce_baseline",
    "a2c",
    "ppo",
    "rloo",
    "grpo",
    "dr_grpo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "gspo",
    "cispo",
    "dapo",
)
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k3_plus")
SUM = {"_target_": "rlhf_lightning.losses.SequenceMeanTokenSum", "normalizer": 1.0}
ALONE = {"algorithm.loss_aggregation": SUM, "algorithm.whiten_advantages": False}
K1_IN_REWARD = {  # the group presets' KL moved into the rewards (k1): only the advantage differs
    "algorithm.kl.reward": {"coef": 0.0, "estimator": "k1", "clamp": None},
    "algorithm.kl.loss": None,
}
VALUE_PRESETS = ("reinforce_baseline", "a2c", "ppo")
GROUP_PRESETS = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline", "gspo", "cispo", "dapo")


@dataclass(frozen=True)
class Problem:
    """A tabular problem: vocabulary, horizon, temperature, beta, seed; rewards 0 for the KL
    table."""

    vocab: int = 3
    horizon: int = 3
    temperature: float = 0.7
    beta: float = 0.1
    seed: int = 0
    zero_reward: bool = False

    def build(self) -> TabularProblem:
        problem = random_problem(self.vocab, self.horizon, self.seed, self.temperature, self.beta)
        if self.zero_reward:
            problem.rewards = torch.zeros_like(problem.rewards)
        return problem


SEQUENCES = Problem()  # 15 responses of at most 3 tokens over 2 tokens + stop
BANDIT = Problem(vocab=4, horizon=1)  # one token of 4 (one of them the stop token)


@dataclass(frozen=True)
class Row:
    """One audited setting and what theory says of it.

    ``expect``: ``exact`` (E[g] = scale * target, to float32 precision) or ``biased``;
    ``values``: the value baseline (``true``: V^pi, ``random``: a fixed random table, ``zero``);
    ``group``: samples per prompt (the batch is one group), else a batch of ``batch``;
    ``target``: ``objective`` (grad J), ``kl`` (-beta grad KL(pi || pi_ref) of the sequence),
    ``kl_per_state`` (the per-state KLs with the state distribution held fixed);
    ``steps``: also at the policy after 1 .. steps ascent steps (samples still from theta_0).
    """

    table: str
    name: str
    preset: str
    theory: str
    expect: str
    overrides: dict = field(default_factory=dict)
    problem: Problem = SEQUENCES
    values: str = "true"
    group: int | None = None
    batch: int = 2
    scale: float = 1.0
    target: str = "objective"
    steps: int = 0

    def config(self):
        b = self.group or self.batch
        overrides = {
            "budget.rollout_batch_size": b,
            "budget.minibatch_size": b,
            "budget.micro_batch_size": 1,  # micro-batches share the minibatch's denominator
            "generation.temperature": self.problem.temperature,
            "generation.max_new_tokens": self.problem.horizon,
            "generation.stop_token": None,
            **({"algorithm.samples_per_prompt": self.group} if self.group else {}),
            **self.overrides,
        }
        return audit_config(self.preset, overrides, kl_coef=self.problem.beta)


STEP = 0.05  # each off-policy step moves the largest logit by this much (ratios stay in the clip)
# GSPO's own bounds (3e-4, 4e-4) clip after the first step: its off-policy row uses PPO's.
OFF_POLICY_CLIP = {
    "gspo": {"algorithm.policy_loss.clip_low": 0.2, "algorithm.policy_loss.clip_high": 0.2}
}


def estimator_rows(problem: Problem = SEQUENCES, group: int = 3) -> list[Row]:
    """Each estimator (and whitening, and each aggregation) on its own, on-policy."""

    def row(name, preset, theory, expect, overrides=None, **kw):
        return Row(
            "estimators",
            name,
            preset,
            theory,
            expect,
            {**ALONE, **(overrides or {})},
            problem,
            **kw,
        )

    T = problem.horizon
    return [
        row("sequence return", "reinforce", "unbiased", "exact"),
        row("rewards-to-go", "reinforce_rtg", "unbiased (causality)", "exact"),
        row(
            "G_t - V(s_t), random V",
            "reinforce_baseline",
            "unbiased for any V(s_t)",
            "exact",
            values="random",
        ),
        row("GAE lam 0.95, true V", "a2c", "unbiased for every lam", "exact"),
        row("GAE lam 0.95, V = 0", "a2c", "biased for lam < 1", "biased", values="zero"),
        row("GAE lam 0.95, random V", "a2c", "biased for lam < 1", "biased", values="random"),
        row(
            "GAE lam 1, random V",
            "a2c",
            "unbiased (G_t - V(s_t))",
            "exact",
            {"algorithm.advantage.lam": 1.0},
            values="random",
        ),
        row(f"leave-one-out, k={group}", "rloo", "unbiased", "exact", group=group),
        row(
            f"group mean and std, k={group}",
            "grpo",
            "biased (std scaling)",
            "biased",
            K1_IN_REWARD,
            group=group,
        ),
        row(
            f"group mean only, k={group}",
            "dr_grpo",
            f"unbiased, scale (k-1)/k = {(group - 1) / group:.3f}",
            "exact",
            K1_IN_REWARD,
            group=group,
            scale=(group - 1) / group,
        ),
        row(
            f"rewards-to-go minus the group mean return, k={group}",
            "reinforce_pp_baseline",
            f"unbiased, scale (k-1)/k = {(group - 1) / group:.3f}",
            "exact",
            group=group,
            scale=(group - 1) / group,
        ),
        row(
            "rewards-to-go, whitened over the batch",
            "reinforce_pp",
            "biased (batch mean and std)",
            "biased",
            {"algorithm.whiten_advantages": True},
        ),
        row(
            "sequence return, token mean",
            "reinforce",
            "biased (length)",
            "biased",
            {"algorithm.loss_aggregation": {"_target_": "rlhf_lightning.losses.TokenMean"}},
        ),
        row(
            "sequence return, seq-mean-token-mean",
            "reinforce",
            "biased (length)",
            "biased",
            {
                "algorithm.loss_aggregation": {
                    "_target_": "rlhf_lightning.losses.SequenceMeanTokenMean"
                }
            },
        ),
        row(
            f"sequence return, seq-mean-token-sum / {T}",
            "reinforce",
            f"unbiased, scale 1/{T}",
            "exact",
            {"algorithm.loss_aggregation": {**SUM, "normalizer": float(T)}},
            scale=1 / T,
        ),
    ]


def preset_rows(problem: Problem = SEQUENCES, group: int = 3, steps: int = 2) -> list[Row]:
    """Every preset as configured, on-policy and after ``steps`` ascent steps."""
    T = problem.horizon
    unbiased = f"unbiased, scale 1/{T} (max_new_tokens)"
    theory = {
        "reinforce": unbiased,
        "reinforce_rtg": unbiased,
        "reinforce_baseline": unbiased,
        "a2c": "biased (whitening, aggregation)",
        "ppo": "biased (whitening, aggregation)",
        "rloo": "length-biased (aggregation)",
        "grpo": "biased (std, length, per-state KL)",
        "dr_grpo": "per-state KL only; scale (k-1)/(k T)",
        "reinforce_pp": "biased (whitening, aggregation)",
        "reinforce_pp_baseline": "biased (whitening, aggregation)",
        # At ratio 1 the geometric-mean sequence ratio and CISPO's clipped weight are 1: the
        # plain policy gradient, so on-policy they are grpo's advantage and aggregation (gspo
        # without grpo's KL loss, as its paper).
        "gspo": "as grpo at ratio 1, no KL: biased (std, length, no KL)",
        "cispo": "as grpo at ratio 1, token mean: biased (std, length, per-state KL)",
        # Dynamic sampling happens before experience making, outside what the audit runs.
        "dapo": "no KL; the length penalty reshapes R; std, token mean: biased",
    }
    # DAPO's overlong penalty over the whole (3-token) length here: -|y| / T added to R.
    overrides = {"dapo": {"algorithm.overlong_penalty": {"cache": T, "coef": 1.0}}}
    return [
        Row(
            "presets",
            preset,
            preset,
            theory[preset],
            "exact" if theory[preset] == unbiased else "biased",
            overrides.get(preset, {}),
            problem=problem,
            group=group if preset in GROUP_PRESETS else None,
            steps=steps,
            scale=1 / T if theory[preset] == unbiased else 1.0,
        )
        for preset in PRESETS
    ]


def batch_size_rows(sizes: tuple[int, ...] = (2, 4, 6)) -> list[Row]:
    """The biases that come from the batch, on the bandit (every response one token, so no
    length effect): whitening over a batch of b, and GRPO's normalisation of a group of k. With
    one group per batch the two are the same computation; they part with more prompts per
    batch: whitening's statistics are the whole batch's, GRPO's stay each group's."""
    rows = []
    for b in sizes:
        rows.append(
            Row(
                "batch",
                f"whitened over a batch of {b}",
                "reinforce_pp",
                "biased; vanishes as the batch grows",
                "biased",
                {**ALONE, "algorithm.whiten_advantages": True},
                BANDIT,
                batch=b,
            )
        )
        rows.append(
            Row(
                "batch",
                f"group mean and std, k={b}",
                "grpo",
                "biased; set by k, not the batch",
                "biased",
                {**ALONE, **K1_IN_REWARD},
                BANDIT,
                group=b,
            )
        )
    return rows


def off_policy_rows(steps: int = 2) -> list[Row]:
    """The losses on stale samples: beta 0 (only the policy is stale), sum aggregation."""
    rows = []
    for problem, horizon in (
        (replace(BANDIT, beta=0.0), "T=1"),
        (replace(SEQUENCES, beta=0.0), "T=3"),
    ):
        bandit = problem.horizon == 1
        per_token = "exact" if bandit else "biased"
        for name, loss, expect, theory in (
            (
                "ratio -A * ratio",
                "vanilla",
                per_token,
                "exact" if bandit else "misses the state distribution",
            ),
            (
                "clipped, inside the clip",
                "clipped",
                per_token,
                "exact" if bandit else "misses the state distribution",
            ),
            ("sequence ratio", "sequence_ratio", "exact", "exact"),
            (
                "GSPO, inside the clip",
                "gspo",
                per_token,
                "exact" if bandit else "geometric mean, not the product: misses the states",
            ),
            (
                "CISPO, inside the clip",
                "cispo",
                per_token,
                "exact" if bandit else "misses the state distribution",
            ),
        ):
            rows.append(
                Row(
                    "off_policy",
                    f"{name}, {horizon}",
                    "reinforce",
                    theory,
                    expect,
                    {**ALONE, "algorithm/policy_loss": loss, **OFF_POLICY_CLIP.get(loss, {})},
                    problem,
                    steps=steps,
                )
            )
        rows.append(
            Row(
                "off_policy",
                f"leave-one-out k=3 + clipped, {horizon}",
                "rloo",
                "exact" if bandit else "misses the state distribution",
                per_token,
                ALONE,
                problem,
                group=3,
                steps=steps,
            )
        )
    return rows


def kl_rows(problems: tuple[Problem, ...] = (BANDIT, SEQUENCES)) -> list[Row]:
    """Every KL estimator x placement, reward 0, against both KL targets."""
    rows = []
    for problem in problems:
        problem = replace(problem, zero_reward=True)
        horizon = f"T={problem.horizon}"
        for placement in ("reward", "loss"):
            for estimator in KL_ESTIMATORS:
                term = {"coef": problem.beta, "estimator": estimator, "clamp": None}
                overrides = {
                    **ALONE,
                    "algorithm.kl.reward": term if placement == "reward" else None,
                    "algorithm.kl.loss": term if placement == "loss" else None,
                    "algorithm.kl.allow_biased_gradient": True,
                }
                for target in ("kl", "kl_per_state"):
                    # With one token the two targets coincide.
                    targets = ("kl", "kl_per_state") if problem.horizon == 1 else (target,)
                    exact = any((placement, estimator, t) in _EXACT_KL for t in targets)
                    rows.append(
                        Row(
                            "kl",
                            f"{estimator} in the {placement}, {horizon}",
                            "reinforce_rtg",
                            KL_THEORY[(placement, estimator)],
                            "exact" if exact else "biased",
                            overrides,
                            problem,
                            values="none",
                            batch=1,
                            target=target,
                        )
                    )
    return rows


KL_THEORY = {
    ("reward", "k1"): "exact",
    ("reward", "abs"): "no pathwise term",
    ("reward", "k2"): "no pathwise term",
    ("reward", "k3"): "no pathwise term",
    ("reward", "k3_plus"): "no pathwise term",
    ("loss", "k1"): "zero in expectation",
    ("loss", "abs"): "no KL's gradient",
    ("loss", "k2"): "exact per state",
    ("loss", "k3"): "reverse KL per state",
    ("loss", "k3_plus"): "exact per state (k2's gradient)",
}
_EXACT_KL = {
    ("reward", "k1", "kl"),
    ("loss", "k2", "kl_per_state"),
    ("loss", "k3_plus", "kl_per_state"),
}


# ------------------------------------------------------------------------------------- runs
def values_for(row: Row, problem: TabularProblem) -> torch.Tensor | None:
    if row.values == "true":
        return true_values(problem)
    if row.values == "random":
        gen = torch.Generator().manual_seed(1)
        return torch.randn(problem.logits.shape[0], generator=gen, dtype=torch.float64)
    return None  # "zero" or "none": the value head's zero init


def target_gradient(row: Row, problem: TabularProblem, logits: torch.Tensor) -> torch.Tensor:
    if row.target == "kl_per_state":
        return -problem.beta * per_state_kl_gradient(problem, logits)
    return objective_gradient(problem, logits)  # with rewards 0 this is -beta grad KL


_MOMENTS: dict[str, list] = {}  # rows that differ only in their target share one computation


def audit(row: Row, cfg=None) -> dict:
    """The row's comparisons: on-policy, then after each ascent step (``cfg``: the row's config,
    composed beforehand; default now)."""
    problem = row.problem.build()
    thetas = ascent_steps(problem, row.steps, STEP)
    start = time.perf_counter()
    key = repr(replace(row, table="", name="", theory="", expect="", target="", scale=1.0))
    if key not in _MOMENTS:
        _MOMENTS[key] = expected_update(
            problem, cfg or row.config(), thetas, values=values_for(row, problem)
        )
    moments = _MOMENTS[key]
    b = row.group or row.batch
    results = []
    for theta, moment in zip(thetas, moments):
        comparison = compare(moment, target_gradient(row, problem, theta)).as_dict()
        comparison["variance"] *= b  # per sample: b samples (or one group of b) per batch
        results.append(comparison)
    return {
        "table": row.table,
        "name": row.name,
        "preset": row.preset,
        "theory": row.theory,
        "expect": row.expect,
        "expected_scale": row.scale,
        "target": row.target,
        "batch": b,
        "batches": moments[0].batches,
        "seconds": time.perf_counter() - start,
        "on_policy": results[0],
        "off_policy": results[1:],
    }


def random_problem_kl_errors(seeds: int = 20) -> dict[str, float]:
    """Median relative error ``||E g - (-beta grad KL)|| / ||beta grad KL||`` of each KL
    estimator in the reward, over ``seeds`` random problems (reward 0, T=3)."""
    errors: dict[str, list[float]] = {}
    for seed in range(seeds):
        problem = replace(SEQUENCES, seed=seed, zero_reward=True)
        for row in kl_rows((problem,)):
            if row.target != "kl" or "reward" not in row.name or row.problem.horizon == 1:
                continue
            result = audit(row)
            errors.setdefault(row.name.split(",")[0], []).append(result["on_policy"]["bias"])
    return {name: float(torch.tensor(values).median()) for name, values in errors.items()}


def all_rows() -> list[Row]:
    return [*estimator_rows(), *batch_size_rows(), *preset_rows(), *off_policy_rows(), *kl_rows()]


# ----------------------------------------------------------------------------------- tables
def fmt(x: float) -> str:
    return f"{x:.1e}" if abs(x) < 1e-3 or abs(x) >= 1e3 else f"{x:.3f}"


def markdown(results: list[dict], kl_medians: dict[str, float]) -> str:
    out = []
    on = "on-policy: scale, bias after scale, cosine, variance per sample"
    for table, title in (
        ("estimators", f"Estimators alone ({on})"),
        ("batch", f"Biases of the batch, one-token bandit ({on})"),
        ("presets", f"Presets as configured ({on}; bias after 1 and 2 steps)"),
        ("off_policy", "Stale samples, beta 0 (bias after scale at 0, 1, 2 steps)"),
        (
            "kl",
            "KL estimator x placement, reward 0 (raw relative bias: vs the sequence KL, "
            "vs the per-state KLs)",
        ),
    ):
        rows = [r for r in results if r["table"] == table]
        out.append(f"### {title}\n")
        if table == "kl":
            out.append("| setting | theory | vs sequence KL | vs per-state KLs |")
            out.append("|---|---|---|---|")
            for name in dict.fromkeys(r["name"] for r in rows):
                pair = {r["target"]: r["on_policy"]["bias"] for r in rows if r["name"] == name}
                theory = next(r["theory"] for r in rows if r["name"] == name)
                out.append(
                    f"| {name} | {theory} | {fmt(pair['kl'])} | {fmt(pair['kl_per_state'])} |"
                )
        elif table == "off_policy":
            out.append("| loss | theory | on-policy | 1 step | 2 steps |")
            out.append("|---|---|---|---|---|")
            for r in rows:
                biases = [r["on_policy"], *r["off_policy"]]
                out.append(
                    f"| {r['name']} | {r['theory']} | "
                    + " | ".join(fmt(c["direction_bias"]) for c in biases)
                    + " |"
                )
        else:
            steps = " | 1 step | 2 steps" if table == "presets" else ""
            out.append(f"| setting | theory | scale | bias | cosine | variance{steps} |")
            out.append("|---|---|---|---|---|---|" + ("---|---|" if steps else ""))
            for r in rows:
                c = r["on_policy"]
                cells = [
                    fmt(c["scale"]),
                    fmt(c["direction_bias"]),
                    f"{c['cosine']:.6f}",
                    fmt(c["variance"]),
                ]
                cells += [fmt(o["direction_bias"]) for o in r["off_policy"]]
                out.append(f"| {r['name']} | {r['theory']} | " + " | ".join(cells) + " |")
        out.append("")
    if kl_medians:
        out.append("### KL in the reward, 20 random problems (median relative error)\n")
        out.append("| estimator | median |")
        out.append("|---|---|")
        out.extend(f"| {name} | {fmt(value)} |" for name, value in kl_medians.items())
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/estimator_audit"))
    parser.add_argument("--kl-seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    args.out.mkdir(parents=True, exist_ok=True)
    rows = all_rows()
    configs = [row.config() for row in rows]  # composed up front: conf/ as it is at the start
    results = []
    for row, cfg in zip(rows, configs):
        results.append(audit(row, cfg))
        r = results[-1]
        print(
            f"{r['table']:>10} {r['name']:<45} bias {r['on_policy']['direction_bias']:.2e} "
            f"({r['batches']} batches, {r['seconds']:.1f} s)",
            flush=True,
        )
    kl_medians = random_problem_kl_errors(args.kl_seeds) if args.kl_seeds else {}
    (args.out / "results.json").write_text(
        json.dumps({"rows": results, "kl_in_reward_medians": kl_medians}, indent=1)
    )
    (args.out / "tables.md").write_text(markdown(results, kl_medians))
    print(markdown(results, kl_medians))


if __name__ == "__main__":
    main()
