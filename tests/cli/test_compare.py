"""Runs grouped by seed: the intervals and tests of `rlhf_lightning.significance` on hand-computed
cases, and ``rlhf-compare``'s groups, intervals and pairs on runs written to disk."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from rlhf_lightning.cli import compare
from rlhf_lightning.significance import (
    Interval,
    crossed_bootstrap_difference,
    crossed_bootstrap_interval,
    t_cdf,
    t_interval,
    t_quantile,
    welch_test,
)
from rlhf_lightning.tracking import group_name

# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    ("p", "df", "quantile"),  # Student's t tables
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.95, 10, 1.8125)],
)
def test_t_quantiles_match_the_tables(p, df, quantile):
    assert t_quantile(p, df) == pytest.approx(quantile, abs=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-quantile, abs=1e-4)
    assert t_cdf(quantile, df) == pytest.approx(p, abs=1e-5)


def test_t_cdf_of_one_degree_of_freedom_is_the_cauchy_cdf():
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_t_interval_over_three_seeds():
    # mean 0.2, s = 0.1, half-width t_{0.975,2} * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    interval = t_interval([0.1, 0.2, 0.3])
    assert interval.mean == pytest.approx(0.2) and interval.n == 3
    assert (interval.low, interval.high) == pytest.approx((-0.048414, 0.448414), abs=1e-6)
    one = t_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high)


def test_welch_test_by_hand():
    # a - b = -3; se = sqrt(1/3 + 1/3) = 0.816497; t = -3.674235; df = 4 (equal variances, n)
    # p = 2 * (1 - F_4(3.674235)) = 0.021312; interval -3 -+ 2.776445 * 0.816497
    d = welch_test([1, 2, 3], [4, 5, 6])
    assert d.diff == -3.0
    assert d.p == pytest.approx(0.021312, abs=1e-6)
    assert (d.low, d.high) == pytest.approx((-5.266958, -0.733042), abs=1e-6)
    # Unequal sizes and variances: var 5/3 over 4, var 7 over 3; df = 2.720233, t = -2.110579
    d = welch_test([1, 2, 3, 4], [4, 5, 9])
    assert d.p == pytest.approx(0.134563, abs=1e-6)
    assert welch_test([1, 1], [1, 1]).p == 1.0 and welch_test([2, 2], [1, 1]).p == 0.0
    assert math.isnan(welch_test([1], [1, 2]).p)


def test_crossed_bootstrap_hand_cases():
    # One seed, prompts scored 0 and 1: the resampled means are 0, 0.5, 1 with probabilities
    # 1/4, 1/2, 1/4, so the 2.5% and 97.5% quantiles are 0 and 1.
    assert crossed_bootstrap_interval([[0.0, 1.0]]) == Interval(0.5, 0.0, 1.0, 2)
    # Seeds 0, 0.5 and 1 on 50 equal prompts: all three seeds drawn 0 happens 1/27 > 2.5% of
    # the time (and all three 1), so the interval is [0, 1]. Over the 150 cells as if they
    # were independent it would be about 0.5 -+ 0.07: the seeds are the unit here.
    seeds = [[0.0] * 50, [0.5] * 50, [1.0] * 50]
    assert crossed_bootstrap_interval(seeds) == Interval(0.5, 0.0, 1.0, 150)
    constant = crossed_bootstrap_interval([[0.25] * 4] * 3)
    assert (constant.low, constant.high) == (0.25, 0.25)


def test_crossed_bootstrap_difference_hand_cases():
    a = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    same = crossed_bootstrap_difference(a, a)
    assert same.diff == 0.0 and same.p == 1.0
    # Seeds that agree, and b = a - 1 on every prompt: the prompts are drawn once for both
    # groups, so every resample's difference is exactly 1.
    a = [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    shifted = crossed_bootstrap_difference(a, [[v - 1 for v in row] for row in a])
    assert (shifted.diff, shifted.low, shifted.high, shifted.p) == (1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="2 and 3 prompts"):
        crossed_bootstrap_difference([[1.0, 0.0]], a)


def test_group_name_leaves_the_seed_out():
    # sorted as "key=value" texts, as Hydra sorts a run's override_dirname
    assert group_name({"seed": "1", "algorithm": "grpo", "algorithm.kl.reward.coef": "0.1"}) == (
        "algorithm.kl.reward.coef=0.1,algorithm=grpo"
    )
    assert group_name({"seed": "1"}) == "all runs"


# ------------------------------------------------------------------------------ rlhf-compare


def write_run(sweep: Path, job: str, overrides: list[str], scalars: dict, heldout=None) -> None:
    """A run dir as a sweep job leaves it: Hydra's overrides, TensorBoard scalars (logged at
    steps 0 and 1, the last one is the run's value), optionally per-prompt rows."""
    run = sweep / job
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(overrides, run / ".hydra" / "overrides.yaml")
    OmegaConf.save({"task": {"metric": "val/reward"}}, run / ".hydra" / "config.yaml")
    writer = SummaryWriter(str(run / "tb"))
    for tag, value in scalars.items():
        writer.add_scalar(tag, -1.0, 0)
        writer.add_scalar(tag, value, 1)
    writer.close()
    if heldout is not None:
        rows = [{"prompt": f"q{i}", "reward": score} for i, score in enumerate(heldout)]
        (run / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def sweep(tmp_path):
    """algorithm=grpo,rloo x seed=0,1,2: val/reward 0.1, 0.2, 0.3 and 0.4, 0.5, 0.6."""
    job = 0
    for algorithm, rewards in (("grpo", [0.1, 0.2, 0.3]), ("rloo", [0.4, 0.5, 0.6])):
        for seed, reward in enumerate(rewards):
            overrides = ["task=ppo", f"algorithm={algorithm}", f"seed={seed}"]
            scores = [1.0] * 4 if algorithm == "rloo" else [float(seed == 0)] * 4
            write_run(tmp_path, str(job), overrides, {"val/reward": reward}, scores)
            job += 1
    return tmp_path


def csv_table(capsys, *argv) -> list[dict]:
    assert compare.main([*argv, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_runs_that_differ_only_by_seed_form_a_group_with_its_interval(sweep, capsys):
    rows = csv_table(capsys, str(sweep), "--table", "groups")
    assert [(r["group"], r["runs"], r["seeds"]) for r in rows] == [
        ("algorithm=grpo", "3", "0 1 2"),
        ("algorithm=rloo", "3", "0 1 2"),
    ]
    # 0.2 -+ 0.248414 and 0.5 -+ 0.248414 (t_{0.975,2} * 0.1 / sqrt(3))
    assert rows[0]["val/reward"] == "0.2 [-0.04841, 0.4484]"
    assert rows[1]["val/reward"] == "0.5 [0.2516, 0.7484]"


def test_groups_are_tested_against_each_other(sweep, capsys):
    (row,) = csv_table(capsys, str(sweep), "--table", "pairs")
    assert (row["a"], row["b"], row["compared"]) == (
        "algorithm=grpo",
        "algorithm=rloo",
        "val/reward",
    )
    # Welch: -0.3 / sqrt(2 * 0.01 / 3) = -3.674235 on 4 df: p = 0.021312 < 0.05
    assert float(row["a - b"]) == pytest.approx(-0.3)
    assert float(row["p"]) == pytest.approx(0.021312, abs=1e-6)
    assert row["differ"] == "yes" and row["test"] == "Welch t over seeds"
    (row,) = csv_table(capsys, str(sweep), "--table", "pairs", "--confidence", "0.99")
    assert row["differ"] == "no"  # p = 0.021 > 0.01


def test_per_prompt_scores_give_the_seeds_x_prompts_unit(sweep, capsys):
    argv = [str(sweep), "--per-prompt", "heldout.jsonl:reward"]
    groups = csv_table(capsys, *argv, "--table", "groups")
    column = "heldout.jsonl:reward (seeds x prompts)"
    # grpo: seed 0 scores 1 on all 4 prompts, seeds 1 and 2 score 0: mean 1/3; a resample
    # holds seed 0 zero to three times, so its mean is 0, 1/3, 2/3 or 1 (P(0) = 8/27 and
    # P(1) = 1/27 > 2.5%): the interval is [0, 1]. rloo scores 1 everywhere: [1, 1].
    assert groups[0][column] == "0.3333 [0, 1]"
    assert groups[1][column] == "1 [1, 1]"
    pairs = csv_table(capsys, *argv, "--table", "pairs")
    assert [r["compared"] for r in pairs] == ["val/reward", "heldout.jsonl:reward"]
    assert pairs[1]["test"] == "bootstrap over seeds x prompts"
    assert float(pairs[1]["a - b"]) == pytest.approx(-2 / 3)
    # every resample with seed 0 drawn three times gives a - b = 0: P = 1/27, so p = 2/27
    assert float(pairs[1]["p"]) == pytest.approx(2 / 27, abs=0.025)
    assert pairs[1]["differ"] == "no"
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    assert "mean and 95% interval over seeds (Student's t" in out
    assert "over seeds x held-out prompts" in out and "| algorithm=grpo | algorithm=rloo |" in out


def test_runs_scored_on_other_prompts_are_not_tested_on_them(sweep, capsys):
    (sweep / "5" / "heldout.jsonl").write_text('{"prompt": "other", "reward": 1}\n')
    rows = csv_table(capsys, str(sweep), "--per-prompt", "heldout.jsonl:reward", "--table", "pairs")
    assert rows[1]["differ"] == "untested"


def test_bad_per_prompt_rows_name_the_file_and_line(sweep, capsys):
    (sweep / "0" / "heldout.jsonl").write_text('{"prompt": "q", "reward": 1}\n{"prompt": "q"}\n')
    with pytest.raises(SystemExit):
        compare.main([str(sweep), "--per-prompt", "heldout.jsonl:reward"])
    assert f"{sweep / '0' / 'heldout.jsonl'}, line 2: 'reward'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(sweep), "--per-prompt", "heldout.jsonl"])
    assert "expected FILE:COLUMN" in capsys.readouterr().err


def test_a_seed_only_sweep_is_one_group(tmp_path, capsys):
    for seed, reward in enumerate([0.5, 0.7]):
        write_run(tmp_path, str(seed), ["task=ppo", f"seed={seed}"], {"val/reward": reward})
    (row,) = csv_table(capsys, str(tmp_path), "--table", "groups")
    assert (row["group"], row["runs"]) == ("all runs", "2")
    # 0.6 -+ t_{0.975,1} * 0.141421 / sqrt(2) = 0.6 -+ 1.270620
    assert row["val/reward"] == "0.6 [-0.6706, 1.871]"
    assert csv_table(capsys, str(tmp_path), "--table", "pairs") == []
