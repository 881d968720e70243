"""The plot scripts under experiments/: PNGs go to the run dir or --out, never into the repo."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
