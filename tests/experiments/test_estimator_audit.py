"""The estimator audit (experiments/estimator_audit/): exact expected updates of the project's own
training step on a tabular LM, against the gradient each preset and KL option claims.

Every row of the audit states what theory says (``exact``, at a known scale, or ``biased``);
these tests hold the code to it on problems small enough to run in seconds: responses of at most
2 tokens over 2 tokens + stop (7 responses), and a one-token bandit over 4 tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.estimator_audit.audit import (
    BANDIT,
    PRESETS,
    SEQUENCES,
    audit,
    estimator_rows,
    kl_rows,
    off_policy_rows,
    preset_rows,
)
from experiments.estimator_audit.tabular import (
    TabularLM,
    enumerate_responses,
    objective,
    random_problem,
    sequence_logprobs,
    token_logprobs,
    true_values,
)

SMALL = replace(SEQUENCES, horizon=2)
EXACT = 1e-6  # float32 arithmetic in the code under test: ~3e-7 is the noise floor here
BIASED = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def test_the_enumeration_is_a_distribution_and_the_lm_computes_the_table():
    """Probabilities of all responses sum to 1, and the project's own logprob path (policy
    forward at temperature T) gives the naive per-token logprobs of the table."""
    from rlhf_lightning.models.value_head import PolicyWithValueHead
    from rlhf_lightning.ops import logprobs_from_logits

    problem = random_problem(vocab=3, horizon=3, seed=4, temperature=0.7)
    ids, mask, ended = problem.responses
    assert len(ids) == 15 and ended.sum() == 1 + 2 + 4  # stop at t = 1, 2, 3
    total = sequence_logprobs(problem, problem.logits).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))
    policy = PolicyWithValueHead(TabularLM(problem.logits, 3, 3), with_value=False)
    input_ids = torch.cat([torch.zeros(len(ids), 1, dtype=torch.long), ids], dim=1)
    attention = torch.cat([torch.ones(len(ids), 1, dtype=torch.long), mask.long()], dim=1)
    logits, _ = policy(input_ids, attention, response_start=1)
    got = torch.where(mask, logprobs_from_logits(logits, ids, 0.7), 0.0)
    torch.testing.assert_close(
        got.double(), token_logprobs(problem, problem.logits), atol=1e-6, rtol=0
    )


def test_the_true_value_of_the_first_state_is_the_objective():
    """V(s_0) = E[sum_t r_t] = E[R] - beta E[log pi / pi_ref] = J."""
    problem = random_problem(vocab=3, horizon=3, seed=2, beta=0.3)
    torch.testing.assert_close(true_values(problem)[0], objective(problem, problem.logits))


def test_the_response_count_follows_the_horizon():
    for vocab, horizon, count in ((3, 1, 3), (3, 2, 7), (4, 3, 40)):
        assert len(enumerate_responses(vocab, horizon)[0]) == count


def _check(row, result) -> None:
    """Exact rows: E[g] = scale * target to float32 precision; biased rows: clearly not."""
    c = result["on_policy"]
    if row.expect == "exact":
        assert c["direction_bias"] < EXACT, (row.name, c)
        assert c["scale"] == pytest.approx(row.scale, abs=EXACT), (row.name, c)
    else:
        assert c["direction_bias"] > BIASED or abs(c["scale"] - 1) > BIASED, (row.name, c)


@pytest.mark.parametrize("row", estimator_rows(SMALL, group=2), ids=lambda r: r.name)
def test_each_estimator_is_unbiased_where_theory_says_so(row):
    _check(row, audit(row))


@pytest.mark.parametrize("row", kl_rows((BANDIT, SMALL)), ids=lambda r: f"{r.name} vs {r.target}")
def test_each_kl_estimator_and_placement_estimates_what_theory_says(row):
    _check(row, audit(row))


@pytest.mark.parametrize("row", off_policy_rows(), ids=lambda r: r.name)
def test_ratio_weighted_losses_on_stale_samples(row):
    """After the policy moved by one and two steps (its samples still from the old one): every
    ratio-weighted loss is exact with one token; with more, the per-token ratio misses the
    change in the state distribution and the sequence ratio does not."""
    if row.problem.horizon > 1:
        row = replace(row, problem=replace(row.problem, horizon=2))
    if row.group:
        row = replace(row, group=2)
    result = audit(row)
    assert result["on_policy"]["direction_bias"] < EXACT  # theta = theta_old: all agree
    for step in result["off_policy"]:
        if row.expect == "exact":
            assert step["bias"] < EXACT, (row.name, step)
        else:
            assert step["direction_bias"] > BIASED, (row.name, step)


def test_the_audit_covers_every_preset():
    shipped = {p.stem for p in (Path(__file__).parents[2] / "conf" / "algorithm").glob("*.yaml")}
    assert set(PRESETS) == shipped


@pytest.mark.parametrize("row", preset_rows(SMALL, group=2, steps=0), ids=lambda r: r.name)
def test_every_preset_as_configured_estimates_what_its_docs_say(row):
    """The REINFORCE rungs are unbiased as configured (at the step scale 1 / max_new_tokens);
    the others estimate grad J up to the biases the table lists, none off by a sign."""
    result = audit(row)
    if row.expect == "exact":
        _check(row, result)
    assert result["on_policy"]["cosine"] > 0.5, result
