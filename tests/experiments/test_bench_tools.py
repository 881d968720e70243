"""The benchmark helpers: what is saved, the reward-reached and speed tables, Adam's step size
vs eps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCH))

from adam_eps_damping import step_sizes  # noqa: E402
from bench_common import add_save_arguments, check_save_arguments, save_due  # noqa: E402
from reward_table import collect, markdown  # noqa: E402
from speed_table import collect as collect_speed  # noqa: E402
from speed_table import markdown as speed_markdown  # noqa: E402
from speed_table import summarize  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_save_arguments(parser)
    args = parser.parse_args(argv)
    check_save_arguments(parser, args)
    return args


def test_save_due_every_k_and_after_the_last_iteration():
    args = _parse(["--save-every", "20", "--save-dir", "x"])
    assert [n for n in range(1, 46) if save_due(args, n, 45)] == [20, 40, 45]
    never = _parse([])
    assert not any(save_due(never, n, 5) for n in range(1, 6))


def test_save_arguments_errors():
    with pytest.raises(SystemExit):
        _parse(["--save-every", "5"])  # no --save-dir
    with pytest.raises(SystemExit):
        _parse(["--save-every", "-1", "--save-dir", "x"])


def _metrics(reward, se=0.05):
    return {
        "metrics": {
            "reward": reward,
            "reward_std_error": se,
            "kl": 1.5,
            "distinct_2": 0.8,
            "win_rate": 0.6,
        }
    }


def test_reward_table_collects_base_then_runs_in_iteration_order(tmp_path):
    (tmp_path / "base_eval.json").write_text(json.dumps(_metrics(0.1)))
    bench = {"summary": {"iteration_s": 12.5, "peak_rss_process_bytes": 3 * 2**30}}
    (tmp_path / "trl.json").write_text(json.dumps(bench))
    for iteration, reward in ((40, 0.5), (20, 0.3)):
        d = tmp_path / "trl" / f"iter_{iteration:03d}"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps(_metrics(reward)))
    d = tmp_path / "ours_shared" / "iter_020"  # no ours_shared.json: the run is not listed
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps(_metrics(0.9)))

    rows = collect(tmp_path)
    assert [(r["run"], r["iteration"], r["reward"]) for r in rows] == [
        ("base", 0, 0.1),
        ("trl", 20, 0.3),
        ("trl", 40, 0.5),
    ]
    assert rows[1]["s_per_iter"] == 12.5 and rows[1]["peak_rss_gib"] == 3.0
    table = markdown(rows).splitlines()
    assert len(table) == 2 + 3
    assert "| 40 | 0.500 ± 0.050 |" in table[-1] and "| 12.5 | 3.00 |" in table[-1]


def _bench(tmp_path, name, s_per_iter, rss_gib):
    summary = {"iteration_s": s_per_iter, "peak_rss_process_bytes": rss_gib * 2**30}
    (tmp_path / f"{name}.json").write_text(json.dumps({"summary": summary}))


def test_speed_table_medians_and_ratios_against_hand_computation(tmp_path):
    for k, (s, rss) in enumerate([(40.0, 7.0), (36.0, 7.2), (38.0, 6.8)], start=1):
        _bench(tmp_path, f"trl_r{k}", s, rss)
    for k, (s, rss) in enumerate([(20.0, 4.0), (24.0, 4.2), (19.0, 4.1)], start=1):
        _bench(tmp_path, f"ours_r{k}", s, rss)
    _bench(tmp_path, "ours_copy_r2", 18.0, 4.5)
    _bench(tmp_path, "ours_copy_r4", 17.0, 4.5)  # no TRL run in round 4: no paired ratio
    (tmp_path / "speed_side_by_side.json").write_text("[]")  # not a result file
    (tmp_path / "ours_r1.log").write_text("")

    rows = summarize(collect_speed(tmp_path))
    assert [r["variant"] for r in rows] == ["trl", "ours", "ours_copy"]
    trl, ours, copy = rows
    assert trl["median_s_per_iter"] == 38.0 and trl["speed_ratio"] == 1.0
    assert ours["s_per_iter"] == [20.0, 24.0, 19.0] and ours["median_s_per_iter"] == 20.0
    assert ours["speed_ratio"] == pytest.approx(38.0 / 20.0)
    assert ours["paired_ratios"] == pytest.approx([40 / 20, 36 / 24, 38 / 19])
    assert ours["memory_ratio"] == pytest.approx(4.1 / 7.0)
    assert copy["rounds"] == [2, 4] and copy["paired_ratios"] == pytest.approx([36 / 18])
    assert copy["speed_ratio"] == pytest.approx(38.0 / 17.5)
    line = speed_markdown(rows).splitlines()[3]
    assert line.startswith("| ours | 20.0, 24.0, 19.0 | 20.0 | 1.90x | 2.00, 1.50, 2.00 |")


def test_speed_table_needs_trl(tmp_path):
    _bench(tmp_path, "ours_r1", 20.0, 4.0)
    with pytest.raises(ValueError, match="trl"):
        summarize(collect_speed(tmp_path))


def test_adam_first_step_size_against_hand_computation():
    import torch

    g = torch.tensor([1e-5, 1e-5, 3e-5])
    sizes = step_sizes(g, (1e-5, 0.0))
    assert sizes[1e-5] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert sizes[0.0] == pytest.approx(1.0)
    # clipped to norm 1: [3, 4] (norm 5) -> [0.6, 0.8]; with eps 0.2: (0.75 + 0.8) / 2
    clipped = step_sizes(torch.tensor([3.0, 4.0]), (0.2,), max_norm=1.0)
    assert clipped[0.2] == pytest.approx(0.775)
    # a norm already below max_norm is left alone
    assert step_sizes(torch.tensor([0.3, 0.4]), (0.2,), max_norm=1.0)[0.2] == pytest.approx(
        (0.6 + 0.4 / 0.6) / 2
    )


def test_timing_reward_model_head_init(tmp_path):
    """--head-std gives TRL's value-head init (N(0, std), zero bias); the default keeps ours."""
    import make_timing_rm
    import torch

    from rlhf_lightning.models import ScalarRewardModel

    make_timing_rm.main(["--backbone", "builtin:tiny", "--out", str(tmp_path / "ours")])
    make_timing_rm.main(
        ["--backbone", "builtin:tiny", "--out", str(tmp_path / "trl"), "--head-std", "1e-4"]
    )
    ours = ScalarRewardModel.from_pretrained(tmp_path / "ours").head
    trl = ScalarRewardModel.from_pretrained(tmp_path / "trl").head
    d = ours.weight.shape[1]
    assert float(ours.weight.std()) == pytest.approx((d + 1) ** -0.5, rel=0.5)
    assert float(trl.weight.std()) == pytest.approx(1e-4, rel=0.5)
    assert torch.count_nonzero(trl.bias) == 0


def _write_ttq_run(out: Path, name: str, iteration_s: list[float], evals: dict[int, tuple]):
    (out / f"{name}.json").write_text(
        json.dumps({"iterations": [{"iteration_s": s} for s in iteration_s]})
    )
    for iteration, (gold, kl) in evals.items():
        d = out / name / f"iter_{iteration:03d}"
        d.mkdir(parents=True)
        metrics = {"reward": gold, "reward_std_error": 0.02, "kl": kl}
        (d / "eval.json").write_text(json.dumps({"metrics": metrics}))


def test_time_to_quality_is_the_first_snapshot_over_the_target_within_the_kl_bound(tmp_path):
    from ttq_table import main as ttq_main

    (tmp_path / "base_eval.json").write_text(json.dumps({"metrics": {"reward": 0.40}}))
    # trl: 10 s per iteration, target 0.70 first met at iteration 4 (40 s)
    _write_ttq_run(tmp_path, "trl", [10.0] * 6, {2: (0.5, 1.0), 4: (0.71, 3.0), 6: (0.8, 5.0)})
    # ours: 5 s per iteration; iteration 2 is over the target but its KL 9 breaks the bound,
    # so iteration 4 (20 s) counts
    _write_ttq_run(tmp_path, "ours_ppo", [5.0] * 6, {2: (0.75, 9.0), 4: (0.70, 2.0)})
    # never reaches the target
    _write_ttq_run(tmp_path, "ours_rloo", [3.0] * 4, {2: (0.45, 1.0), 4: (0.6, 1.0)})
    result = ttq_main([str(tmp_path), "--runs", "trl ours_ppo ours_rloo"])
    assert result["target"] == pytest.approx(0.70)
    runs = result["runs"]
    assert runs["trl"]["seconds_to_target"] == 40.0
    assert runs["ours_ppo"]["seconds_to_target"] == 20.0
    assert runs["ours_ppo"]["ratio_to_trl"] == pytest.approx(0.5)
    # crossed after the last snapshot that missed (the KL-breaking one counts as a miss)
    assert runs["trl"]["seconds_last_miss"] == 20.0
    assert runs["ours_ppo"]["seconds_last_miss"] == 10.0
    assert runs["ours_rloo"]["reached"] is None and runs["ours_rloo"]["ratio_to_trl"] is None
    assert (tmp_path / "gold_vs_time.png").is_file()
    saved = json.loads((tmp_path / "time_to_quality.json").read_text())
    assert saved["runs"]["ours_ppo"]["reached"]["iteration"] == 4


def test_cost_growth_fits_recover_known_exponents_and_slopes():
    from cost_growth import fit_line, fit_power

    xs = [32, 64, 128, 256]
    fit = fit_power(xs, [0.5 * x**1.0 for x in xs])
    assert fit["exponent"] == pytest.approx(1.0) and fit["factor"] == pytest.approx(0.5)
    assert fit_power(xs, [3e-4 * x**2 for x in xs])["exponent"] == pytest.approx(2.0)
    line = fit_line([0, 1, 2, 3], [10.0, 10.5, 11.0, 11.5])
    assert line["slope"] == pytest.approx(0.5) and line["intercept"] == pytest.approx(10.0)
