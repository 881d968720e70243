"""Masked reductions and per-token log-probability helpers (pure torch).

A *mask* marks the real (non-padding) positions of a tensor of the same shape. It may be bool or
hold the numbers 0 and 1. Padded positions never reach a result, even when they hold NaN or inf:
every function selects values with ``torch.where`` before doing arithmetic on them, because
``nan * 0`` is ``nan`` and multiplying by the mask would leak it.

``logprobs_from_logits`` and ``entropy_from_logits`` upcast to float32 and work one batch row at a
time: with a 49k-token vocabulary the ``(B, T, V)`` logits are the largest tensor of a PPO step, so
a full float32 log-softmax of them must never exist. Both divide the logits by the sampling
temperature first, so that the log-probabilities match the distribution the responses were drawn
from (Huang et al. 2023, "The N implementation details of RLHF with PPO").
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool_mask(mask: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Check a mask against ``shape`` and return it as a bool tensor.

    mask: bool, or numbers that are all 0 or 1, with exactly ``shape``.
    Raises ValueError for a wrong shape or for values other than 0/1 (e.g. soft weights), which
    would otherwise be silently read as True.
    """
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must be bool or contain only 0 and 1")
    return mask != 0


def zero_masked(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` with the positions where ``keep`` is False set to 0 (NaN and inf included).

    x: any shape; keep: bool, same shape -> same shape as x. Gradients reaching the zeroed
    positions are 0, so NaN there cannot leak into a backward pass either.
    """
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is true.

    x: any shape; mask: same shape as x.
    dim=None sums everything and returns a 0-dim tensor; otherwise reduces ``dim``.
    """
    selected = zero_masked(x, as_bool_mask(mask, x.shape))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true.

    x: any shape; mask: same shape as x.
    dim=None averages everything (0-dim result); otherwise reduces ``dim``.
    Raises ValueError if the mask selects nothing (in any slice along ``dim``).
    """
    keep = as_bool_mask(mask, x.shape)
    count = keep.sum() if dim is None else keep.sum(dim=dim)
    if bool((count == 0).any()):
        raise ValueError("masked_mean: the mask selects no element (in at least one slice)")
    return masked_sum(x, keep, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is true; a 0-dim tensor.

    x: any shape; mask: same shape as x.
    unbiased=True divides by ``n - 1`` (Bessel's correction) and needs n >= 2; otherwise by ``n``.
    """
    keep = as_bool_mask(mask, x.shape)
    n = int(keep.sum())
    if n < 2 and unbiased:
        raise ValueError(f"masked_var: unbiased variance needs at least 2 elements, got {n}")
    x = zero_masked(x, keep)  # before any arithmetic: keeps NaN out of the gradients too
    mean = masked_mean(x, keep)
    return masked_sum((x - mean) ** 2, keep) / (n - 1 if unbiased else n)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the masked positions.

    x: any shape; mask: same shape as x -> same shape as x.
    Computes ``(x - mean) / sqrt(var + eps)`` with the masked mean and unbiased masked variance.
    shift_mean=False adds the mean back, so only the scale changes (used for rewards, where the
    sign of the mean carries information). Masked-out positions of the output are 0.
    """
    keep = as_bool_mask(mask, x.shape)
    x = zero_masked(x, keep)
    mean = masked_mean(x, keep)
    var = masked_var(x, keep, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_masked(whitened, keep)


def _check_logits(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``, in float32.

    logits: (B, T, V), any float dtype; tokens: (B, T) integer ids in [0, V) -> (B, T) float32.
    Computes ``logits[token] - logsumexp(logits)`` one batch row at a time, so at most one (T, V)
    float32 slice exists beyond the input when run without grad. (Under autograd each row's
    float32 slice is kept for the backward pass, as with any log-softmax.)
    """
    _check_logits(logits, temperature)
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}, expected {tuple(logits.shape[:2])}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    vocab_size = logits.shape[-1]
    if tokens.numel() and bool((tokens.min() < 0) | (tokens.max() >= vocab_size)):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got an id outside it")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens.long()):
        scaled = row_logits.float() / temperature  # (T, V)
        picked = scaled.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, in float32.

    logits: (B, T, V), any float dtype -> (B, T) float32. One batch row at a time, like
    ``logprobs_from_logits``. Vocabulary entries with logit -inf (probability 0) contribute 0.
    """
    _check_logits(logits, temperature)
    rows = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)  # (T, V)
        p = logp.exp()
        rows.append(-(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1))
    return torch.stack(rows)


def last_true_index(mask: Tensor) -> Tensor:
    """Index of the last true position of each row.

    mask: (B, T) bool or 0/1 -> (B,) long. Works for left-, right- and un-padded rows.
    Raises ValueError if a row has no true position.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    keep = as_bool_mask(mask, mask.shape)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last = torch.where(keep, positions, -1).amax(dim=1)
    if bool((last < 0).any()):
        raise ValueError("last_true_index: a row of the mask has no true position")
    return last
