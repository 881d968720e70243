"""The plot scripts under experiments/: PNGs go to the run dir or --out, never into the repo."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"

# iteration -> (learned reward, gold score, KL, response length)
EVALS = {0: (-0.1, 0.2, 0.0, 28.0), 5: (0.5, 0.4, 2.0, 29.0), 10: (1.0, 0.6, 3.5, 30.0)}


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.replace("/", "_"), EXPERIMENTS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(run_dir: Path, kl_coef: float = 0.05) -> None:
    """A run dir as a PPO run leaves it: TensorBoard scalars under tb/, .hydra/config.yaml."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    for step, (reward, gold, kl, length) in EVALS.items():
        writer.add_scalar("val/reward", reward, step)
        writer.add_scalar("val/gold_score", gold, step)
        writer.add_scalar("val/kl", kl, step)
        writer.add_scalar("val/response_length", length, step)
    for step in range(10):
        writer.add_scalar("objective/score", 0.1 * step, step)
        writer.add_scalar("kl/sequence", 0.3 * step, step)
    writer.close()
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        "seed: 42\n"
        "algorithm:\n"
        "  num_iterations: 10\n"
        "  kl:\n"
        "    controller:\n"
        "      _target_: rlhf_lightning.kl.FixedKLController\n"
        f"    coef: {kl_coef}\n"
    )


def _experiments_state() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under experiments/."""
    return {
        str(p.relative_to(REPO)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in EXPERIMENTS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def experiments_untouched():
    before = _experiments_state()
    yield
    assert _experiments_state() == before, "a plot script wrote under experiments/"


def test_sentiment_plot_writes_into_the_run_dir_by_default(tmp_path, capsys, experiments_untouched):
    run = tmp_path / "run"
    _write_run(run)
    _load("sentiment/plot.py").main([str(run)])
    for name in ("curves.png", "gold_vs_kl.png"):
        assert (run / "plots" / name).stat().st_size > 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert table[1:] == [
        "| 0 | -0.100 | 0.200 | 0.000 | 28.000 |",
        "| 5 | 0.500 | 0.400 | 2.000 | 29.000 |",
        "| 10 | 1.000 | 0.600 | 3.500 | 30.000 |",
    ]


def test_sentiment_plot_writes_where_out_says(tmp_path, experiments_untouched):
    run = tmp_path / "run"
    _write_run(run)
    _load("sentiment/plot.py").main([str(run), "--out", str(tmp_path / "figures")])
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "curves.png",
        "gold_vs_kl.png",
    ]
    assert not (run / "plots").exists()


def test_kl_sweep_plot_default_and_out(tmp_path, capsys, experiments_untouched):
    sweep, other = tmp_path / "sweep", tmp_path / "other"
    _write_run(sweep / "0_coef", kl_coef=0.0)
    _write_run(sweep / "1_coef", kl_coef=0.1)
    _write_run(other / "run", kl_coef=0.05)
    plot = _load("kl_sweep/plot.py")

    plot.main([str(sweep), str(other)])
    assert (sweep / "plots" / "reward_vs_kl.png").stat().st_size > 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| fixed")]
    assert len(rows) == 3 * len(EVALS)

    plot.main([str(other), "--out", str(tmp_path / "figures")])
    assert (tmp_path / "figures" / "reward_vs_kl.png").stat().st_size > 0
    assert not (other / "plots").exists()


def _write_family_run(run_dir: Path, preset: str, seed: int, accuracy: dict, scores: list) -> None:
    """A run of ``experiment=verifiable_family`` as it leaves its dir: ``val/reward`` per
    evaluation, ``heldout.jsonl``, ``.hydra/config.yaml``."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    for step, value in accuracy.items():
        writer.add_scalar("val/reward", value, step)
    writer.close()
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nalgorithm:\n  name: {preset}\n")
    rows = [json.dumps({"prompt": f"q{i}", "reward": s}) for i, s in enumerate(scores)]
    (run_dir / "heldout.jsonl").write_text("\n".join(rows) + "\n")


def test_family_table_groups_presets_over_seeds_against_the_start(tmp_path, experiments_untouched):
    family = _load("verifiable/family.py")
    # Holm: p sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert family.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = family.holm([0.01, math.nan, 0.04, 0.03])  # no test (one seed): not counted
    assert math.isnan(adjusted[1])
    assert [adjusted[i] for i in (0, 2, 3)] == pytest.approx([0.03, 0.06, 0.06])
    right = [1.0] * 8 + [0.0] * 2  # 10 problems
    wrong = [0.0] * 10
    for seed, final in enumerate((0.6, 0.7, 0.8)):
        _write_family_run(tmp_path / "a" / f"{seed}", "good", seed, {4: 0.5, 8: final}, right)
        _write_family_run(tmp_path / "b" / f"{seed}", "bad", seed, {4: 0.1, 8: 0.0}, wrong)
    (tmp_path / "c" / ".hydra").mkdir(parents=True)  # a run that did not finish: no heldout.jsonl
    (tmp_path / "c" / ".hydra" / "config.yaml").write_text("seed: 0\nalgorithm:\n  name: bad\n")
    base = tmp_path / "base.jsonl"
    base.write_text("".join(f'{{"reward": {s}}}\n' for s in [1.0] * 2 + [0.0] * 8))
    out = tmp_path / "out"
    summary = family.main(
        [str(tmp_path / d) for d in "abc"] + ["--base", str(base), "--out", str(out)]
    )
    good, bad = summary["presets"]["good"], summary["presets"]["bad"]
    assert good["seeds"] == bad["seeds"] == [0, 1, 2]
    final = good["by_iteration"][8]  # mean 0.7, t(2) 0.975-quantile 4.303 x sd 0.1 / sqrt(3)
    assert final["mean"] == pytest.approx(0.7)
    assert final["high"] - final["mean"] == pytest.approx(4.3027 * 0.1 / 3**0.5, rel=1e-3)
    assert good["change_from_base"]["diff"] == pytest.approx(0.6)  # 0.8 - 0.2, problem by problem
    assert bad["change_from_base"]["diff"] == pytest.approx(-0.2)
    (pair,) = summary["pairs"]
    assert (pair["a"], pair["b"]) == ("good", "bad")
    assert pair["bootstrap"]["diff"] == pytest.approx(0.8)
    assert pair["bootstrap_p_holm"] < 0.05 and pair["welch_p_holm"] < 0.05
    assert family.verdict(pair) == "yes"
    assert (out / "family.png").is_file() and (out / "family.json").is_file()


def test_family_orders_presets_by_the_ladder_and_lists_the_pairs_that_differ(
    tmp_path, experiments_untouched
):
    family = _load("verifiable/family.py")
    right, wrong = [1.0] * 8 + [0.0] * 2, [0.0] * 10
    # found in this order (directory names sort first by name): other, grpo, reinforce
    for seed in range(3):
        _write_family_run(tmp_path / f"a{seed}", "other", seed, {8: 0.1}, wrong)
        _write_family_run(tmp_path / f"b{seed}", "grpo", seed, {8: 0.1 + 0.01 * seed}, wrong)
        _write_family_run(tmp_path / f"c{seed}", "reinforce", seed, {8: 0.7 + 0.1 * seed}, right)
    presets = family.runs_by_preset([tmp_path])
    assert list(presets) == ["reinforce", "grpo", "other"]  # the ladder, then the rest
    summary = family.summarize(presets, [wrong], "base")
    assert [(p["a"], p["b"]) for p in summary["pairs"]] == [
        ("reinforce", "grpo"), ("reinforce", "other"), ("grpo", "other")
    ]  # fmt: skip
    table = family.markdown(summary)
    listed = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| reinf")]
    assert listed[1:] == [["| reinforce", "grpo"], ["| reinforce", "other"]]  # [0]: its row
    assert "The other 1 pairs" in table
    assert "| grpo | other |" in family.markdown(summary, all_pairs=True)
    swapped = family.runs_by_preset([tmp_path], {"grpo": "other", "other": "grpo"})
    assert [r["evals"][8] for r in swapped["other"]] == pytest.approx([0.1, 0.11, 0.12])
    assert [r["evals"][8] for r in swapped["grpo"]] == pytest.approx([0.1] * 3)


def _write_side_by_side(out: Path, seed: int, ours: dict, trl: dict) -> None:
    """What run_side_by_side.sh leaves for one seed: each framework's accuracy at iterations 4
    and 8 (``ours``/``trl``: iteration -> accuracy over 10 problems), 10 s per iteration for
    ours and 12 s for TRL (4 optimizer steps of 3 s), peak RSS 4.0 / 4.4 GB."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    run = out / f"ours_s{seed}"
    writer = SummaryWriter(str(run / "tb"))
    for iteration in range(1, 9):
        writer.add_scalar("time/iteration", 10.0, iteration - 1)
    for iteration, accuracy in ours.items():
        writer.add_scalar("val/reward", accuracy, iteration)
    writer.close()
    last = [{"prompt": f"q{i}", "reward": float(i < 10 * ours[8])} for i in range(10)]
    (run / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in last))
    run = out / f"trl_s{seed}"
    run.mkdir()
    steps = [3.0 * (k + 1) for k in range(32)]
    result = {"steps_per_iteration": 4, "step_wall_s": steps}
    (run / "result.json").write_text(json.dumps(result))
    for iteration, accuracy in trl.items():
        rows = [{"prompt": f"q{i}", "reward": float(i < 10 * accuracy)} for i in range(10)]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (run / f"heldout_step{4 * iteration}.jsonl").write_text(text)
    for name, kbytes in (("ours", 4_000_000_000 // 1024), ("trl", 4_400_000_000 // 1024)):
        (out / f"{name}_s{seed}.time").write_text(
            f"\tMaximum resident set size (kbytes): {kbytes}\n"
        )


def test_side_by_side_times_each_framework_to_the_target_on_its_own_clock(tmp_path):
    side = _load("verifiable/side_by_side.py")
    ours = [{4: 0.2, 8: 0.3}, {4: 0.1, 8: 0.2}, {4: 0.1, 8: 0.1}]  # seed 2 never reaches 0.2
    trl = [{4: 0.1, 8: 0.2}, {4: 0.1, 8: 0.2}, {4: 0.3, 8: 0.3}]
    for seed in range(3):
        _write_side_by_side(tmp_path, seed, ours[seed], trl[seed])
    summary = side.main([str(tmp_path), "--target", "0.2"])
    a, b = summary["frameworks"]["rlhf_lightning"], summary["frameworks"]["trl"]
    assert a["time_to_target_s"] == [40.0, 80.0, None]
    assert a["time_to_target"]["n"] == 2 and a["time_to_target"]["mean"] == pytest.approx(60.0)
    assert b["time_to_target_s"] == pytest.approx([96.0, 96.0, 48.0])
    assert a["train_s_per_iteration"]["mean"] == pytest.approx(10.0)
    assert b["train_s_per_iteration"]["mean"] == pytest.approx(12.0)
    assert a["peak_rss_gb"]["mean"] == pytest.approx(4.0, abs=1e-5)
    assert a["accuracy"][8]["mean"] == pytest.approx(0.2)
    assert b["final_seeds_x_problems"]["mean"] == pytest.approx(0.7 / 3)
    diff = summary["rlhf_lightning_minus_trl"]
    assert diff["accuracy_bootstrap"]["diff"] == pytest.approx(0.2 - 0.7 / 3)
    assert diff["train_s_welch"]["diff"] == pytest.approx(80.0 - 96.0)
    assert diff["peak_rss_welch"]["diff"] == pytest.approx(-0.4, abs=1e-5)


def test_verifier_pairs_put_a_better_answer_against_a_worse_one_of_the_same_problem(
    tmp_path, tiny_model_dir
):
    import json
    import random

    make_pairs = _load("verifiable/make_pairs.py")
    answers, scores = ["7", "8", "7", " 9"], [1.0, 0.0, 1.0, 0.0]
    many = make_pairs.pairs_of("Q", answers, scores, 5, random.Random(0))
    assert sorted((p["chosen"], p["rejected"]) for p in many) == [("7", " 9"), ("7", "8")]
    (one,) = make_pairs.pairs_of("Q", answers, scores, 1, random.Random(0))
    assert one["prompt"] == "Q" and one["chosen"] == "7"
    assert make_pairs.pairs_of("Q", ["1", "2"], [0.0, 0.0], 5, random.Random(0)) == []

    out = tmp_path / "pairs"
    argv = ["--policy", str(tiny_model_dir), "--problems", "4", "--samples", "3"]
    argv += ["--data", "reasoning_gym_chain_sum", "train_size=6", "eval_size=4", "shots=1"]
    argv += ["--reward", "token_fraction", "target=e", "--stop-token", "eos"]
    summary = make_pairs.main([*argv, "--max-new-tokens", "6", "--out", str(out)])
    assert summary["problems"] == 4 and summary["answers"] == 12
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == summary["pairs"] == summary["problems_with_a_pair"] >= 1

    def fraction(text: str) -> float:
        return text.count("e") / len(text) if text else 0.0

    assert all(fraction(r["chosen"]) > fraction(r["rejected"]) for r in rows)
    assert all(r["prompt"].endswith("A:") for r in rows)


def _write_overopt_run(run_dir: Path, proxy: str, seed: int, evals: dict) -> None:
    """A run of an over-optimisation sweep: iteration -> (proxy reward, gold, KL)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    for step, (reward, gold, kl) in evals.items():
        writer.add_scalar("val/reward", reward, step)
        writer.add_scalar("val/gold_score", gold, step)
        writer.add_scalar("val/kl", kl, step)
    writer.close()
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nreward:\n  path: /proxies/{proxy}/reward_model\n"
    )


def test_overopt_plot_averages_seeds_of_a_proxy_and_tests_the_turn(
    tmp_path, capsys, experiments_untouched
):
    # rm_a: gold rises then falls in every seed; rm_b: in one seed it rises, in the other it falls
    golds_a = {0: (0.10, 0.30, 0.20), 1: (0.10, 0.40, 0.25), 2: (0.10, 0.35, 0.15)}
    for seed, (g0, g1, g2) in golds_a.items():
        evals = {0: (0.0, g0, 0.0), 2: (1.0, g1, 1.0 + seed), 4: (2.0, g2, 4.0)}
        _write_overopt_run(tmp_path / "sweep" / f"a{seed}", "rm_a", seed, evals)
    _write_overopt_run(
        tmp_path / "sweep" / "b0", "rm_b", 0, {0: (0, 0.1, 0), 2: (1, 0.2, 1), 4: (2, 0.3, 4)}
    )
    _write_overopt_run(
        tmp_path / "sweep" / "b1", "rm_b", 1, {0: (0, 0.1, 0), 2: (1, 0.3, 1), 4: (2, 0.1, 4)}
    )
    for seed, last in ((0, 0.11), (1, 0.09)):  # rm_c: gold only falls
        evals = {0: (0, 0.3, 0), 2: (1, 0.2, 1), 4: (2, last, 4)}
        _write_overopt_run(tmp_path / "sweep" / f"c{seed}", "rm_c", seed, evals)
    for seed, last in ((0, 0.5), (1, 0.6)):  # rm_d: gold highest at the end
        evals = {0: (0, 0.1, 0), 2: (1, 0.3, 1), 4: (2, last, 4)}
        _write_overopt_run(tmp_path / "sweep" / f"d{seed}", "rm_d", seed, evals)
    _write_overopt_run(
        tmp_path / "sweep" / "e0", "rm_e", 0, {0: (0, 0.1, 0), 2: (1, 0.3, 1), 4: (2, 0.2, 4)}
    )
    # an unfinished rm_a run (a fourth seed): left out, not cutting the others short
    _write_overopt_run(
        tmp_path / "sweep" / "a3", "rm_a", 3, {0: (0.0, 0.1, 0.0), 2: (1.0, 0.9, 1.0)}
    )
    plot = _load("overopt/plot.py")

    result = plot.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "gold_proxy_vs_sqrt_kl.png").stat().st_size > 0
    assert (tmp_path / "plots" / "overopt.json").stat().st_size > 0

    curve_a = result["curves"]["rm_a"]
    assert [c["iteration"] for c in curve_a] == [0, 2, 4]
    assert curve_a[1]["seeds"] == 3
    assert curve_a[1]["gold"].mean == pytest.approx(0.35)
    # t(0.975, 2) = 4.3027; sd of (0.30, 0.40, 0.35) = 0.05
    assert curve_a[1]["gold"].high - 0.35 == pytest.approx(4.3027 * 0.05 / math.sqrt(3), rel=1e-4)
    sqrt_kls = [math.sqrt(1.0), math.sqrt(2.0), math.sqrt(3.0)]
    assert curve_a[1]["sqrt_kl"].mean == pytest.approx(sum(sqrt_kls) / 3)

    turn_a = result["turns"]["rm_a"]
    assert turn_a["peak_iteration"] == 2 and turn_a["last_iteration"] == 4
    # rises per seed: 0.20, 0.30, 0.25; falls: 0.10, 0.15, 0.20 -> means 0.25, 0.15, sd 0.05
    assert turn_a["rise"].mean == pytest.approx(0.25)
    assert turn_a["fall"].mean == pytest.approx(0.15)
    assert turn_a["fall"].low == pytest.approx(0.15 - 4.3027 * 0.05 / math.sqrt(3), rel=1e-4)
    assert turn_a["turned"]
    turn_b = result["turns"]["rm_b"]
    assert turn_b["peak_iteration"] == 2 and turn_b["fall"].mean == pytest.approx(0.05)
    assert not turn_b["turned"]  # falls -0.1 and +0.2: the interval spans 0
    turn_c = result["turns"]["rm_c"]
    assert turn_c["peak_iteration"] == 0 and turn_c["fall"].mean == pytest.approx(0.2)
    assert not turn_c["turned"]  # it falls beyond the noise, but never rose
    out = capsys.readouterr().out
    assert "rm_a: the mean gold rises" in out and ": a turn" in out
    assert "rm_b: the mean gold rises" in out and "no turn the seeds support" in out
    assert "rm_c: the mean gold never rises above its start" in out
    assert "rm_d: the mean gold rises" in out and "its last evaluation: no fall" in out
    assert "rm_e: the mean gold rises" in out and "one seed, no interval" in out
    assert result["left_out"] == [str(tmp_path / "sweep" / "a3")]
    assert f"left out (fewer evaluations than the other runs of its proxy): {tmp_path}" in out

    def no_nan(name):
        raise ValueError(name)

    saved = json.loads((tmp_path / "plots" / "overopt.json").read_text(), parse_constant=no_nan)
    assert saved["turns"]["rm_e"]["fall"]["low"] is None  # one seed: no bound


def test_proxy_check_counts_ordered_pairs_within_each_problem():
    check = _load("verifiable/proxy_check.py")
    prompts = ["A", "A", "A", "B", "B", "B", "B", "C", "C"]
    gold = [1, 0, 0, 1, 1, 0, 0, 0, 0]
    proxy = [0.5, 0.2, 0.5, 0.1, 0.15, 0.2, 0.12, 0.9, 0.0]
    res = check.pair_accuracy(prompts, gold, proxy)
    # A: 0.5 > 0.2, 0.5 = 0.5 (a half): 1.5 of 2 pairs; B: of 0.1 and 0.15 against 0.2 and 0.12
    # only 0.15 > 0.12: 1 of 4; C has no correct answer. Pooled over pairs 2.5 / 6 (the mean of
    # the problems' 0.75 and 0.25 would be 0.5).
    assert (res["problems"], res["pairs"]) == (2, 6)
    assert res["pair_accuracy"] == pytest.approx(2.5 / 6)
    # resampled problems: BB 0.25 and AA 0.75 (a quarter of the draws each), AB 2.5 / 6
    assert res["low"] == pytest.approx(0.25) and res["high"] == pytest.approx(0.75)
    # pooled: each of the 3 correct answers against each of the 6 wrong ones: 4.5 + 1 + 2
    assert res["auc"] == pytest.approx(7.5 / 18)

    rows = [
        {"prompt": "A", "response": " 1", "reward": 1.0},
        {"prompt": "A", "response": " 1", "reward": 0.0},  # the same answer again: the first counts
        {"prompt": "A", "response": " 2", "reward": 0.0},
        {"prompt": "B", "response": " 1", "reward": 0.0},
    ]
    assert check.distinct_answers(rows) == [rows[0], rows[2], rows[3]]


def test_proxy_check_names_the_answers_a_proxy_favours():
    import torch

    check = _load("verifiable/proxy_check.py")

    def reward(prompts, responses):  # the problem "x" favours 1, every other problem 3
        target = [1 if p == "x" else 3 for p in prompts]
        return torch.tensor([-abs(int(r) - t) for r, t in zip(responses, target)], dtype=float)

    res = check.favourite_answers(reward, ["x", "y", "z"], -2, 5)
    assert list(res["favourites"].items()) == [(" 3", 2), (" 1", 1)]  # most problems first
    # mean over the three problems: 3 -> -2/3, 2 -> -1, 1 -> -4/3, 4 -> -5/3 ...
    assert list(res["best_mean"])[:3] == [" 3", " 2", " 1"]
    assert res["best_mean"][" 3"] == pytest.approx(-2 / 3)
    assert len(res["best_mean"]) == 6
