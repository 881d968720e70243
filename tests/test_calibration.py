"""Calibration of sigmoid(r_w - r_l): ECE by hand, on simulated models, and as val/ece."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from rlhf_lightning.calibration import (
    calibration_bins,
    expected_calibration_error,
    reliability_table,
)
from rlhf_lightning.config import rm_config_from
from rlhf_lightning.models import ScalarRewardModel, load_tokenizer
from rlhf_lightning.models.reward_model import score_pairs
from rlhf_lightning.modules.reward_model import RewardModelModule
from tests.conftest import compose_config


def _margins(probabilities: list[float]) -> torch.Tensor:
    """Reward margins r_w - r_l whose sigmoid is each probability."""
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p))


def test_ece_hand_values():
    # p(chosen wins) 0.92, 0.92, 0.17, 0.64 -> confidences 0.92, 0.92, 0.83, 0.64, right, right,
    # wrong, right. 5 bins of width 0.1 over [0.5, 1]: bin 4 holds the two 0.92 (accuracy 1),
    # bin 3 the 0.83 (accuracy 0), bin 1 the 0.64 (accuracy 1).
    bins = calibration_bins(_margins([0.92, 0.92, 0.17, 0.64]), num_bins=5)
    assert bins[:, 0].tolist() == [0, 1, 0, 1, 2]
    ece = expected_calibration_error(bins)
    assert ece == pytest.approx((2 * 0.08 + 0.83 + 0.36) / 4)
    rows = reliability_table(bins)
    assert [(r["count"], r["accuracy"]) for r in rows] == [(1, 1.0), (1, 0.0), (2, 1.0)]
    assert rows[0]["low"] == pytest.approx(0.6) and rows[0]["high"] == pytest.approx(0.7)
    assert rows[2]["confidence"] == pytest.approx(0.92)


def test_ties_count_half_and_confidence_one_falls_in_the_last_bin():
    bins = calibration_bins(torch.tensor([0.0, 1000.0]), num_bins=4)
    assert bins[0].tolist() == [1.0, 0.5, 0.5]  # p = 0.5: confidence 0.5, half right
    assert bins[3].tolist() == [1.0, 1.0, 1.0]  # p = 1: confidence 1, right
    assert expected_calibration_error(bins) == 0.0


def test_bins_add_up_over_batches():
    margins = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 3
    whole = calibration_bins(margins)
    parts = calibration_bins(margins[:37]) + calibration_bins(margins[37:])
    torch.testing.assert_close(parts, whole)
    assert whole[:, 0].sum() == 100


def test_a_calibrated_model_has_small_ece_and_an_overconfident_one_a_large_one():
    """Pairs whose outcome is drawn from sigmoid(m): with the true margins the model is
    calibrated; with margins x4 it is overconfident by a known amount."""
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(20_000, generator=generator, dtype=torch.float64) * 2
    chosen_first = torch.rand(20_000, generator=generator, dtype=torch.float64) < torch.sigmoid(m)
    margins = torch.where(chosen_first, m, -m)  # r_w - r_l of the pair as labelled
    assert expected_calibration_error(calibration_bins(margins)) < 0.02
    overconfident = expected_calibration_error(calibration_bins(4 * margins))
    # expected: E|sigmoid(4|m|) - sigmoid(|m|)|, the mean gap between claimed and true accuracy
    expected = (torch.sigmoid(4 * m.abs()) - torch.sigmoid(m.abs())).mean().item()
    assert overconfident == pytest.approx(expected, abs=0.02)
    assert overconfident > 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="num_bins"):
        calibration_bins(torch.zeros(3), num_bins=0)
    with pytest.raises(ValueError, match="finite"):
        calibration_bins(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="no pairs"):
        expected_calibration_error(torch.zeros(10, 3))


def test_validation_logs_the_ece_of_all_held_out_pairs(tmp_path):
    """val/ece over 4 validation batches equals the ECE of the margins scored one by one."""
    overrides = [
        f"paths.output_dir={tmp_path}",
        "task=reward_model",
        "reward_backbone=tiny",
        "data/preferences=tiny",
        "data.preferences.eval_batch_size=8",
    ]
    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(cfg.reward_backbone.name_or_path, padding_side="right")
    datamodule = instantiate(cfg.data.preferences, tokenizer=tokenizer)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model = ScalarRewardModel.from_backbone(cfg.reward_backbone.name_or_path)
    with torch.no_grad():  # spread the scores so that the pairs fall into several bins
        model.head.weight.mul_(30)
    module = RewardModelModule(model, rm_config_from(cfg.rm))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)

    items = datamodule.eval_items
    assert len(items) == 32  # 4 batches of 8
    prompts = [item["prompt"] for item in items] * 2
    responses = [item["chosen"] for item in items] + [item["rejected"] for item in items]
    model.text_format = datamodule.text_format  # as the task exports it
    scores = score_pairs(model, tokenizer, prompts, responses)
    margins = scores[: len(items)] - scores[len(items) :]
    bins = calibration_bins(margins)
    assert (bins[:, 0] > 0).sum() >= 2
    expected = expected_calibration_error(bins)
    assert trainer.callback_metrics["val/ece"].item() == pytest.approx(expected, abs=1e-5)
