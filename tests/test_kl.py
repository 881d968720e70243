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
    kl_estimator,
    kl_penalty,
    sequence_kl,
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
        ("k3_plus", [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1]),
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


# ------------------------------------------------------------------------------ KL as a loss
def _expected_loss_gradient(kind: str, logits: torch.Tensor, ref_logp: torch.Tensor):
    """Exact ``E_{x ~ pi}[grad_theta k(x)]`` with the sample held fixed (no gradient through the
    sampling): sum over every outcome x of ``pi(x) * grad k(log pi(x), log pi_ref(x))``."""
    theta = logits.clone().requires_grad_()
    logp = torch.log_softmax(theta, dim=-1)
    weights = logp.exp().detach()  # pi(x), a constant
    (weights * kl_penalty(logp, ref_logp, kind)).sum().backward()
    return theta.grad


def _exact_kl_gradient(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    theta = logits.clone().requires_grad_()
    logp = torch.log_softmax(theta, dim=-1)
    (logp.exp() * (logp - ref_logp)).sum().backward()  # KL(pi || pi_ref), differentiated fully
    return theta.grad


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_only_k2_and_k3_plus_have_the_gradient_of_kl_as_a_loss(kind):
    """On a 5-way categorical, computed exactly (no sampling): the expected gradient of k2 and
    k3_plus equals grad KL(pi || pi_ref); k1's is 0, abs's and k3's are something else."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, generator=gen, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(5, generator=gen, dtype=torch.float64), dim=-1)
    exact = _exact_kl_gradient(logits, ref_logp)
    assert exact.abs().max() > 0.05  # a real gradient, not a degenerate case
    expected = _expected_loss_gradient(kind, logits, ref_logp)
    matches = torch.allclose(expected, exact, atol=1e-12, rtol=1e-9)
    assert matches == (kl_estimator(kind).loss_bias is None), (kind, expected, exact)
    if kind == "k1":
        torch.testing.assert_close(expected, torch.zeros(5, dtype=torch.float64))


def test_k3_plus_gradient_is_k2_and_its_value_is_k3():
    d = torch.tensor([0.7, -1.3, 0.01], requires_grad=True)
    kl_penalty(d, torch.zeros(3), "k3_plus").sum().backward()
    torch.testing.assert_close(d.grad, d.detach())  # d/dd of d^2 / 2
    expected = [math.exp(-x) - 1 + x for x in d.tolist()]
    assert kl_penalty(d.detach(), torch.zeros(3), "k3_plus").tolist() == pytest.approx(
        expected, rel=1e-4
    )


# ----------------------------------------------------------------------------- controllers


def test_fixed_controller_never_moves_and_round_trips():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=64)
    assert controller.value == 0.05
    fresh = FixedKLController(1.0)
    fresh.load_state_dict(controller.state_dict())
    assert fresh.value == 0.05
    with pytest.raises(ValueError, match=r"^coef: must be >= 0, got -0.1$"):
        FixedKLController(-0.1)
    assert FixedKLController(0.0).value == 0.0  # no KL penalty is a valid choice


def test_adaptive_controller_hand_values():
    controller = AdaptiveKLController(coef=0.2, target=6.0, horizon=10_000)
    controller.update(6.6, n_steps=500)  # error 0.1, inside the clip
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 500 / 10_000))
    controller.update(torch.tensor(6.0), n_steps=500)  # on target: no change; tensors accepted
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 500 / 10_000))


@pytest.mark.parametrize("kl, moves_up", [(12.0, True), (7.0, True), (5.0, False), (0.0, False)])
def test_adaptive_controller_moves_toward_the_target(kl, moves_up):
    controller = AdaptiveKLController(coef=0.2, target=6.0, horizon=1_000)
    controller.update(kl, n_steps=100)
    assert (controller.value > 0.2) is moves_up
    assert controller.value != 0.2


@pytest.mark.parametrize("kl, factor", [(1e9, 1 + 0.2 * 100 / 1_000), (0.0, 1 - 0.2 * 100 / 1_000)])
def test_adaptive_controller_step_is_clipped(kl, factor):
    controller = AdaptiveKLController(coef=0.2, target=6.0, horizon=1_000)
    controller.update(kl, n_steps=100)
    assert controller.value == pytest.approx(0.2 * factor)


def test_adaptive_controller_state_round_trips_into_a_fresh_controller():
    trained = AdaptiveKLController(coef=0.2, target=6.0, horizon=1_000)
    for kl in (9.0, 3.0, 7.5):
        trained.update(kl, n_steps=64)
    fresh = AdaptiveKLController(coef=0.2, target=6.0, horizon=1_000)
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
        ({"coef": -1.0, "target": 6.0, "horizon": 100}, "coef: must be >= 0, got -1.0"),
        ({"coef": 0.1, "target": 0.0, "horizon": 100}, "target: must be > 0, got 0.0"),
        ({"coef": 0.1, "target": 6.0, "horizon": 0}, "horizon: must be > 0, got 0"),
    ],
)
def test_adaptive_controller_validates_its_arguments(kwargs, message):
    from rlhf_lightning.errors import FieldError

    with pytest.raises(FieldError) as error:
        AdaptiveKLController(**kwargs)
    assert str(error.value) == message
    # Values just inside the bounds are valid.
    AdaptiveKLController(coef=0.0, target=0.5, horizon=0.5)


def test_adaptive_controller_rejects_bad_updates():
    controller = AdaptiveKLController(coef=0.1, target=6.0, horizon=100)
    with pytest.raises(ValueError, match="finite"):
        controller.update(float("nan"), n_steps=10)
    with pytest.raises(ValueError, match="^n_steps must be >= 0, got -1$"):
        controller.update(7.0, n_steps=-1)
    controller.update(12.0, n_steps=0)  # no samples since the last update: no change
    assert controller.value == 0.1
    with pytest.raises(ValueError, match="non-positive"):
        controller.update(0.0, n_steps=500)  # factor 1 - 0.2 * 5 = 0
    assert controller.value == 0.1


def test_the_clamp_bounds_an_extreme_estimate_and_stops_its_gradient():
    """d = log pi - log pi_ref = -100: k3 = exp(100) - 101 overflows float32 to inf; clamped at
    10 it is 10 with gradient 0, and estimates inside the bound are unchanged."""
    d = torch.tensor([-100.0, 0.5, -0.5], requires_grad=True)
    assert torch.isinf(kl_penalty(d, torch.zeros(3), "k3")[0])
    clamped = kl_penalty(d, torch.zeros(3), "k3", clamp=10.0)
    assert clamped[0] == 10.0
    torch.testing.assert_close(clamped[1:], kl_penalty(d, torch.zeros(3), "k3")[1:])
    clamped.sum().backward()
    assert d.grad[0] == 0 and d.grad[1] != 0
    assert kl_penalty(torch.tensor([30.0]), torch.zeros(1), "k1", clamp=10.0) == 10.0
    assert kl_penalty(torch.tensor([-30.0]), torch.zeros(1), "k1", clamp=10.0) == -10.0


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_biased_pairs_are_those_outside_k1_in_the_reward_and_k2_k3_plus_as_a_loss(kind, placement):
    from rlhf_lightning.kl import biased_kl_gradient

    unbiased = (placement == "reward" and kind == "k1") or (
        placement == "loss" and kind in ("k2", "k3_plus")
    )
    assert (biased_kl_gradient(kind, placement) is None) == unbiased


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
@pytest.mark.parametrize("clamp", [0.5, 10.0, 30.0])
def test_the_clamped_estimate_is_the_estimate_clamped(kind, clamp):
    """Bounding the log-ratio first changes no value: past the bound every estimator is past
    the clamp too (float64, so that k3 stays finite up to |d| = 60)."""
    d = torch.linspace(-60, 60, 2401, dtype=torch.float64)
    expected = kl_penalty(d, torch.zeros_like(d), kind).clamp(-clamp, clamp)
    torch.testing.assert_close(kl_penalty(d, torch.zeros_like(d), kind, clamp=clamp), expected)


def test_sequence_kl_sums_the_real_tokens_log_ratio_and_ignores_padding():
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), -3.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.25, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_kl(logprobs, ref, mask).tolist() == pytest.approx([0.5 - 1.0, -0.25])


def test_a_kl_term_clamps_its_estimate():
    from rlhf_lightning.kl import KLTerm

    term = KLTerm(kl_estimator("k1"), FixedKLController(0.1), clamp=2.0)
    estimate = term.estimate(torch.tensor([5.0, -5.0, 1.0]), torch.zeros(3))
    assert estimate.tolist() == [2.0, -2.0, 1.0]


def test_the_penalty_state_round_trips_and_refuses_other_sites_by_name():
    """Each site's controller state is restored; a state saved with other sites (a run resumed
    with the KL moved from the rewards to the loss) is refused, naming both."""
    from rlhf_lightning.kl import KLPenalty, KLTerm

    def penalty(*sites):
        terms = {s: KLTerm(kl_estimator("k1"), AdaptiveKLController(0.2, 6.0, 100)) for s in sites}
        return KLPenalty(**terms)

    trained = penalty("reward", "loss")
    trained.update(9.0, n_steps=50)
    fresh = penalty("reward", "loss")
    fresh.load_state_dict(trained.state_dict())
    assert fresh.reward_coef == fresh.loss_coef == trained.reward_coef != 0.2
    with pytest.raises(KeyError, match=r"sites \['loss', 'reward'\], this run \['loss'\]"):
        penalty("loss").load_state_dict(trained.state_dict())
