"""Calibration of a Bradley-Terry reward model: is sigmoid(r_w - r_l) a probability?

A reward model trained with the Bradley-Terry loss predicts that response a is preferred to
response b with probability ``p = sigmoid(r_a - r_b)``. On held-out pairs (chosen w, rejected l)
its prediction for the pair is ``p = sigmoid(r_w - r_l)``; the model is right when ``p > 0.5``.
Calibration is judged on the top label, as for any binary classifier (Guo et al. 2017): the
confidence ``max(p, 1 - p)`` in [0.5, 1] against whether the predicted winner is the chosen
response (a tie, ``p == 0.5``, counts as half right). The pairs are put into ``num_bins``
equal-width confidence bins over [0.5, 1] (the last bin includes 1), and

    ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|.

This equals the usual binary ECE over [0, 1] with ``2 * num_bins`` bins computed on both
orderings of every pair ((w, l) with outcome 1 and (l, w) with outcome 0).

The per-bin sums (`calibration_bins`) add up over batches and ranks, so a validation loop can
accumulate them and compute the exact ECE of all its pairs once (`expected_calibration_error`).
"""

from __future__ import annotations

import torch

DEFAULT_NUM_BINS = 10
COUNT, CONFIDENCE_SUM, CORRECT_SUM = 0, 1, 2


def calibration_bins(margins: torch.Tensor, num_bins: int = DEFAULT_NUM_BINS) -> torch.Tensor:
    """Per-bin sums of pairs with reward margins ``r_w - r_l``: (N,) -> (num_bins, 3) float64.

    Columns: number of pairs, sum of confidences ``max(p, 1 - p)``, sum of correctness (1 if
    ``p > 0.5``, 0.5 if ``p == 0.5``, else 0), with ``p = sigmoid(margin)``. Bin ``k`` holds the
    confidences in ``[0.5 + k w, 0.5 + (k + 1) w)`` with ``w = 0.5 / num_bins``; the last bin
    also holds 1.0.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    margins = margins.detach().double().flatten()
    if not torch.isfinite(margins).all():
        raise ValueError("calibration needs finite reward margins")
    p = torch.sigmoid(margins)
    confidence = torch.maximum(p, 1 - p)
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    index = ((confidence - 0.5) / 0.5 * num_bins).long().clamp(0, num_bins - 1)
    bins = torch.zeros(num_bins, 3, dtype=torch.float64, device=margins.device)
    bins[:, COUNT].index_add_(0, index, torch.ones_like(confidence))
    bins[:, CONFIDENCE_SUM].index_add_(0, index, confidence)
    bins[:, CORRECT_SUM].index_add_(0, index, correct)
    return bins


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE of the pairs summarised by (num_bins, 3) `calibration_bins` sums (added up over
    batches or ranks). Raises ValueError for no pairs."""
    total = bins[:, COUNT].sum()
    if total <= 0:
        raise ValueError("expected calibration error of no pairs")
    gaps = (bins[:, CORRECT_SUM] - bins[:, CONFIDENCE_SUM]).abs()  # n_b * |acc_b - conf_b|
    return float(gaps.sum() / total)


def reliability_table(bins: torch.Tensor) -> list[dict]:
    """One row per non-empty bin: ``low``, ``high`` (confidence range), ``count``,
    ``confidence`` (mean), ``accuracy``; from (num_bins, 3) `calibration_bins` sums."""
    num_bins = bins.shape[0]
    width = 0.5 / num_bins
    rows = []
    for k in range(num_bins):
        count = bins[k, COUNT].item()
        if count == 0:
            continue
        rows.append(
            {
                "low": 0.5 + k * width,
                "high": 0.5 + (k + 1) * width,
                "count": int(count),
                "confidence": bins[k, CONFIDENCE_SUM].item() / count,
                "accuracy": bins[k, CORRECT_SUM].item() / count,
            }
        )
    return rows
