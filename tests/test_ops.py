"""Tests for rlhf_lightning.ops: masked reductions, log-probabilities, entropy, last index."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_lightning.ops import (
    entropy_from_logits,
    last_true_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    zero_masked,
)

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])
SELECTED = torch.tensor([1.0, 2.0, 3.0, 10.0])


def poisoned(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with NaN and inf written into its masked-out positions."""
    garbage = torch.full_like(x, math.nan)
    garbage.view(-1)[::2] = math.inf
    return torch.where(mask.bool(), x, garbage)


# ----------------------------------------------------------------------------- masked reductions


def test_masked_sum_and_mean_hand_values():
    assert masked_sum(X, MASK).item() == 16.0
    assert masked_mean(X, MASK).item() == 4.0
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([6.0, 10.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 10.0]))
    torch.testing.assert_close(
        masked_mean(X[:, :3], MASK[:, :3], dim=0), torch.tensor([5.5, 2.0, 3.0])
    )


def test_masked_mean_raises_when_the_mask_or_a_slice_is_empty():
    with pytest.raises(
        ValueError, match=r"^masked_mean: the mask selects no element \(in at least one slice\)$"
    ):
        masked_mean(X, MASK.clone().fill_(False))
    with pytest.raises(ValueError, match="selects no element"):
        masked_mean(X, MASK, dim=0)  # column 3 has no true position


@pytest.mark.parametrize("dtype", [torch.float32, torch.long, torch.int32])
def test_numeric_masks_match_bool_masks(dtype):
    mask = MASK.to(dtype)
    assert masked_mean(X, mask).item() == masked_mean(X, MASK).item()
    assert masked_var(X, mask).item() == masked_var(X, MASK).item()
    torch.testing.assert_close(masked_whiten(X, mask), masked_whiten(X, MASK))


def test_bad_masks_are_rejected():
    with pytest.raises(ValueError, match="^mask must be bool or contain only 0 and 1$"):
        masked_mean(X, MASK.float() * 0.5)
    with pytest.raises(ValueError, match="shape"):
        masked_mean(X, MASK[:, :3])


def test_masked_var_matches_torch_var_of_the_selected_values():
    torch.testing.assert_close(masked_var(X, MASK), SELECTED.var())
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), SELECTED.var(unbiased=False))


def test_masked_var_needs_two_elements_when_unbiased():
    one = torch.zeros_like(MASK)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one)
    assert masked_var(X, one, unbiased=False).item() == 0.0
    one[0, 1] = True  # two elements, 1 and 2: unbiased variance 0.5
    assert masked_var(X, one).item() == 0.5


def test_masked_whiten_of_a_constant_is_zero_not_nan():
    x = torch.full((2, 3), 4.0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_whiten(x, mask).tolist() == [[0.0] * 3] * 2
    assert masked_whiten(x, mask, shift_mean=False)[mask].tolist() == [4.0] * 3


def test_zero_masked_keeps_the_dtype():
    keep = torch.tensor([True, False])
    for x in (torch.tensor([3, 4]), torch.tensor([1.5, 2.5], dtype=torch.float64)):
        out = zero_masked(x, keep)
        assert out.dtype == x.dtype and out.tolist() == [x[0].item(), 0]


def test_masked_whiten_gives_mean_zero_and_variance_one():
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    white = masked_whiten(x, mask)
    assert abs(masked_mean(white, mask).item()) < 1e-6
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (white[~mask] == 0).all()


def test_masked_whiten_without_shift_keeps_the_mean():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)) + 4
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    white = masked_whiten(x, mask, shift_mean=False)
    real = x[mask].tolist()
    mean, std = statistics.mean(real), statistics.stdev(real)
    expected = [(v - mean) / math.sqrt(std**2 + 1e-8) + mean for v in real]
    assert white[mask].tolist() == pytest.approx(expected, abs=1e-5)
    assert (white[~mask] == 0).all()


@pytest.mark.parametrize(
    "reduce",
    [
        lambda x, m: masked_sum(x, m),
        lambda x, m: masked_mean(x, m),
        lambda x, m: masked_mean(x, m, dim=1).sum(),
        lambda x, m: masked_var(x, m),
        lambda x, m: (masked_whiten(x, m) * torch.arange(4.0)).sum(),
        lambda x, m: (masked_whiten(x, m, shift_mean=False) * torch.arange(4.0)).sum(),
    ],
    ids=["sum", "mean", "mean_dim", "var", "whiten", "whiten_noshift"],
)
def test_nan_and_inf_in_padding_change_neither_value_nor_gradient(reduce):
    clean = X.clone().requires_grad_()
    dirty = poisoned(X, MASK).requires_grad_()
    reduce(clean, MASK).backward()
    reduce(dirty, MASK).backward()
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~MASK] == 0).all()
    torch.testing.assert_close(dirty.grad, clean.grad)
    torch.testing.assert_close(reduce(dirty, MASK), reduce(clean, MASK))


# ----------------------------------------------------------------------------- logprobs / entropy


def naive_logprobs(logits, tokens, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def random_logits(dtype, shape=(3, 5, 11), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_naive_log_softmax(dtype, temperature):
    logits = random_logits(dtype)
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    out = logprobs_from_logits(logits, tokens, temperature)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    # bf16: the reference is the fp32 computation on the same (rounded) bf16 values.
    torch.testing.assert_close(out, naive_logprobs(logits, tokens, temperature))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_matches_the_naive_formula(dtype, temperature):
    logits = random_logits(dtype)
    out = entropy_from_logits(logits, temperature)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    torch.testing.assert_close(out, naive_entropy(logits, temperature))


def test_temperature_divides_the_logits():
    logits = random_logits(torch.float32)
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        logprobs_from_logits(logits, tokens, 0.5), logprobs_from_logits(logits * 2, tokens)
    )
    torch.testing.assert_close(entropy_from_logits(logits, 0.5), entropy_from_logits(logits * 2))
    assert not torch.allclose(
        logprobs_from_logits(logits, tokens, 0.5), logprobs_from_logits(logits, tokens)
    )


def test_logprobs_hand_value_and_gradient_match_naive():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probabilities 1/4, 3/4
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    logits = random_logits(torch.float32).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(logprobs_from_logits(logits, tokens, 0.7).sum(), logits)
    (expected,) = torch.autograd.grad(naive_logprobs(logits, tokens, 0.7).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_entropy_of_uniform_and_of_masked_vocabulary():
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    # -inf entries (e.g. top-k filtered) have probability 0 and add nothing, and no NaN appears.
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    assert entropy.item() == pytest.approx(math.log(2))
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_logprobs_reject_bad_inputs():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        logprobs_from_logits(logits, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        logprobs_from_logits(logits, torch.full((2, 3), -1))
    with pytest.raises(ValueError, match=r"^tokens has shape \(2, 4\), expected \(2, 3\)$"):
        logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        logprobs_from_logits(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        entropy_from_logits(torch.zeros(3, 5))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_full_batch_vocabulary_tensor_is_created(dtype):
    batch, time, vocab = 4, 3, 50
    logits = random_logits(dtype, (batch, time, vocab))
    tokens = torch.randint(0, vocab, (batch, time))
    for compute in (
        lambda: logprobs_from_logits(logits, tokens, 0.7),
        lambda: entropy_from_logits(logits, 0.7),
    ):
        with torch.no_grad(), LargestTensor() as tracker:
            compute()
        assert tracker.largest <= time * vocab  # one row, never (B, T, V)


# ----------------------------------------------------------------------------- last_true_index


def test_last_true_index_for_right_left_and_unpadded_rows():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right-padded
            [0, 0, 1, 1, 1],  # left-padded
            [1, 1, 1, 1, 1],  # no padding
            [1, 0, 0, 0, 0],  # length 1
            [0, 1, 0, 1, 0],  # holes
        ]
    )
    torch.testing.assert_close(last_true_index(mask), torch.tensor([2, 4, 4, 0, 3]))
    assert last_true_index(mask.bool()).dtype == torch.long


def test_last_true_index_rejects_an_empty_row():
    message = r"^last_true_index: a row of the mask has no true position$"
    with pytest.raises(ValueError, match=message):
        last_true_index(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        last_true_index(torch.ones(3, dtype=torch.bool))
