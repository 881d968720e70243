"""Tests for rlhf_lightning.kl: per-token estimators and the KL coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_lightning.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
)

# log-ratios d = logp - logp_ref of +1 and -1
LOGP = torch.tensor([-1.0, -2.0])
REF = torch.tensor([-2.0, -1.0])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [1.0, -1.0]),
        ("abs", [1.0, 1.0]),
        ("k2", [0.5, 0.5]),
        ("k3", [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1]),
    ],
)
def test_estimators_hand_values(kind, expected):
    torch.testing.assert_close(kl_penalty(LOGP, REF, kind), torch.tensor(expected))


def test_all_estimators_are_zero_when_the_policies_agree():
    for kind in KL_ESTIMATORS:
        assert (kl_penalty(LOGP, LOGP, kind) == 0).all()


def test_unknown_estimator_names_the_valid_ones():
    with pytest.raises(ValueError, match="k1.*abs.*k2.*k3"):
        kl_penalty(LOGP, REF, "k4")


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(LOGP, REF[:1], "k1")


finite_logprob = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite_logprob, finite_logprob), min_size=1, max_size=20))
def test_k3_is_never_negative(pairs):
    logp, ref = torch.tensor(pairs, dtype=torch.float32).T
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_k3_is_precise_for_tiny_log_ratios():
    d = torch.tensor([1e-4, -1e-4])
    # exp(-d) - 1 + d = d^2 / 2 - d^3 / 6 + ... In float32, exp(-d) - 1 would lose every digit
    # of this 5e-9 result (float32 spacing near 1 is 6e-8); expm1 keeps three.
    expected = d.double() ** 2 / 2 - d.double() ** 3 / 6
    torch.testing.assert_close(
        kl_penalty(d, torch.zeros(2), "k3").double(), expected, rtol=2e-3, atol=0
    )


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_sample_mean_estimates_the_true_kl(kind):
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()  # 0.2410...
    n = 200_000
    tokens = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = kl_penalty(p.log()[tokens], q.log()[tokens], kind)
    standard_error = estimates.std().item() / math.sqrt(n)
    assert abs(estimates.mean().item() - true_kl) < 4 * standard_error
    assert standard_error < 0.01  # the check above is tight, not vacuous


# ----------------------------------------------------------------------------- controllers


def test_fixed_controller_never_moves_and_round_trips():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=64)
    assert controller.value == 0.05
    fresh = FixedKLController(1.0)
    fresh.load_state_dict(controller.state_dict())
    assert fresh.value == 0.05
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(-0.1)


def test_adaptive_controller_hand_values():
    controller = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10_000)
    controller.update(6.6, n_steps=500)  # error 0.1, inside the clip
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 500 / 10_000))
    controller.update(torch.tensor(6.0), n_steps=500)  # on target: no change; tensors accepted
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 500 / 10_000))


@pytest.mark.parametrize("kl, moves_up", [(12.0, True), (7.0, True), (5.0, False), (0.0, False)])
def test_adaptive_controller_moves_toward_the_target(kl, moves_up):
    controller = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=1_000)
    controller.update(kl, n_steps=100)
    assert (controller.value > 0.2) is moves_up
    assert controller.value != 0.2


@pytest.mark.parametrize("kl, factor", [(1e9, 1 + 0.2 * 100 / 1_000), (0.0, 1 - 0.2 * 100 / 1_000)])
def test_adaptive_controller_step_is_clipped(kl, factor):
    controller = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=1_000)
    controller.update(kl, n_steps=100)
    assert controller.value == pytest.approx(0.2 * factor)


def test_adaptive_controller_state_round_trips_into_a_fresh_controller():
    trained = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=1_000)
    for kl in (9.0, 3.0, 7.5):
        trained.update(kl, n_steps=64)
    fresh = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=1_000)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.value == trained.value != 0.2
    trained.update(8.0, n_steps=64)
    fresh.update(8.0, n_steps=64)
    assert fresh.value == trained.value
    with pytest.raises(KeyError, match="value"):
        fresh.load_state_dict({})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_coef": -1.0, "target": 6.0, "horizon": 100}, "init_coef"),
        ({"init_coef": 0.1, "target": 0.0, "horizon": 100}, "target"),
        ({"init_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_controller_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveKLController(**kwargs)


def test_adaptive_controller_rejects_bad_updates():
    controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    with pytest.raises(ValueError, match="finite"):
        controller.update(float("nan"), n_steps=10)
    with pytest.raises(ValueError, match="non-positive"):
        controller.update(0.0, n_steps=500)  # factor 1 - 0.2 * 5 = 0
    assert controller.value == 0.1
