"""Studies: run hyper-parameters in TensorBoard's HParams tab, sweeps, ``rlhf-compare``."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_lightning.cli import compare
from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.tracking import flatten_hparams, run_name

TINY_PPO = ["experiment=tiny_smoke", "task=ppo", "reward=token_fraction"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _hparams_of(event_dir: Path) -> dict:
    """The hparams of the HParams-plugin session start written in ``event_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def _csv_rows(capsys, *argv: str) -> list[dict]:
    assert compare.main([*argv, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


# flatten_hparams -------------------------------------------------------------------------------


def test_flatten_hparams_gives_flat_scalars_of_the_ppo_groups():
    cfg = _compose("task=ppo", "policy=tiny", "algorithm.kl.coef=0.1", "data.prompts.batch_size=4")
    flat = flatten_hparams(cfg, cfg.hydra)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["task"] == "ppo" and flat["seed"] == 42
    assert flat["algorithm.kl.coef"] == 0.1 and flat["algorithm.policy_loss.clip_low"] == 0.2
    assert flat["generation.temperature"] == 0.7
    assert flat["algorithm.kl.controller._target_"] == "FixedKLController"
    assert flat["algorithm.policy_loss.dual_clip"] == "null"  # None, as TensorBoard accepts it
    assert "task.eval_every" not in flat  # bookkeeping
    assert flat["reward._target_"] == "VaderReward"
    assert flat["policy"] == "tiny" and flat["policy.name_or_path"] == "builtin:tiny"
    assert flat["data/prompts"] == "sentiment" and flat["kl"] == "fixed"
    assert flat["data.prompts.batch_size"] == 4  # every command-line override is a column
    assert not any(k.startswith(("rm", "reward_backbone", "logger", "paths")) for k in flat)


def test_flatten_hparams_follows_the_task():
    rm = flatten_hparams(_compose("task=reward_model"))
    assert rm["rm.lr"] == 5.0e-5 and "rm.monitor" not in rm
    assert not any(k.startswith(("algorithm", "policy")) for k in rm)
    pipeline = flatten_hparams(_compose("task=pipeline"))
    assert pipeline["rm.lr"] == 5.0e-5 and pipeline["algorithm.kl.coef"] == 0.05
    assert pipeline["reward._target_"] == "LearnedReward"
    assert "reward.path" not in pipeline  # an interpolated path of the run
    assert pipeline["gold_reward._target_"] == "VaderReward"


# run_name --------------------------------------------------------------------------------------


def _hydra_cfg(tmp_path: Path, mode: str, task_overrides: list[str], params=None):
    return OmegaConf.create(
        {
            "mode": mode,
            "sweep": {"dir": str(tmp_path)},
            "sweeper": {"params": params},
            "overrides": {"task": task_overrides},
            "job": {
                "override_dirname": ",".join(sorted(task_overrides)),
                "config": {"override_dirname": {"kv_sep": "=", "item_sep": ","}},
            },
        }
    )


def test_run_name_is_what_the_sweep_varies(tmp_path):
    job = ["task=ppo", "seed=2", "algorithm.kl.coef=0.1"]
    assert run_name(_hydra_cfg(tmp_path, "RUN", job)) == ""  # a single run: no sub-dir
    # Swept in the config (an experiment's hydra.sweeper.params, an Optuna search space).
    params = {"algorithm.kl.coef": "0.0,0.1"}
    assert run_name(_hydra_cfg(tmp_path, "MULTIRUN", job, params)) == "algorithm.kl.coef=0.1"
    # Nothing known to be swept: all overrides, as Hydra's override_dirname.
    assert (
        run_name(_hydra_cfg(tmp_path, "MULTIRUN", job)) == "algorithm.kl.coef=0.1,seed=2,task=ppo"
    )
    # Swept on the command line: read from the multirun.yaml the basic sweeper writes.
    command = ["task=ppo", "seed=1,2", "algorithm.kl.coef=0.0,0.1"]
    OmegaConf.save({"hydra": {"overrides": {"task": command}}}, tmp_path / "multirun.yaml")
    assert run_name(_hydra_cfg(tmp_path, "MULTIRUN", job)) == "algorithm.kl.coef=0.1,seed=2"


# log_final_hparams + rlhf-compare, on real event files -----------------------------------------


def _fake_run(run_dir: Path, kl_coef: float, rewards: list[float]) -> None:
    """A run dir as a sweep job leaves it: Hydra's files and TensorBoard logs with hparams."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from rlhf_lightning.tracking import log_final_hparams

    cfg = _compose("task=ppo", "policy=tiny", f"algorithm.kl.coef={kl_coef}")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        ["task=ppo", "policy=tiny", f"algorithm.kl.coef={kl_coef}"],
        run_dir / ".hydra" / "overrides.yaml",
    )
    OmegaConf.save(OmegaConf.masked_copy(cfg, ["task"]), run_dir / ".hydra" / "config.yaml")
    logger = TensorBoardLogger(run_dir, name="tb", version=f"algorithm.kl.coef={kl_coef}")
    for step, reward in enumerate(rewards):
        logger.log_metrics({"val/reward": reward, "train/other": 1.0}, step=step)
    logger.finalize("success")
    trainer = L.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False)
    logged = log_final_hparams(trainer, cfg, {"val/reward": rewards[-1]})
    assert logged == {"hparams/val/reward": rewards[-1]}


def test_final_hparams_reach_tensorboard_and_rlhf_compare(tmp_path, capsys):
    _fake_run(tmp_path / "a", 0.0, [0.1, 0.2, 0.3])
    _fake_run(tmp_path / "b", 0.2, [0.5, 0.4])

    hparams = _hparams_of(tmp_path / "a" / "tb" / "algorithm.kl.coef=0.0")
    assert hparams["algorithm.kl.coef"] == 0.0 and hparams["task"] == "ppo"

    rows = _csv_rows(capsys, str(tmp_path))
    assert [r["run"] for r in rows] == ["a", "b"]
    assert [r["algorithm.kl.coef"] for r in rows] == ["0.0", "0.2"]  # the override that differs
    assert "policy" not in rows[0] and "task" not in rows[0]  # the same in every run
    assert [float(r["val/reward"]) for r in rows] == pytest.approx([0.3, 0.4])  # last values
    assert "train/other" not in rows[0]  # default metrics: task.metric and val/*

    rows = _csv_rows(capsys, str(tmp_path), "--metrics", "hparams/val/reward,train/other,nope")
    assert list(rows[0]) == [
        "algorithm.kl.coef",
        "hparams/val/reward",
        "train/other",
        "nope",
        "run",
    ]
    assert rows[0]["nope"] == ""

    assert compare.main([str(tmp_path)]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0] == "| algorithm.kl.coef | val/reward | run |"
    assert markdown[3] == "| 0.2 | 0.4 | b |"


def test_rlhf_compare_refuses_a_dir_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path)])
    assert "no runs found" in capsys.readouterr().err


# configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["pipeline", "reward_model", "ppo"])
def test_tiny_smoke_experiment_composes_for_every_task(task):
    cfg = _compose("experiment=tiny_smoke", f"task={task}")
    assert cfg.policy.name_or_path == "builtin:tiny" and cfg.reward_backbone.name_or_path
    assert cfg.budget.num_iterations == 2 and cfg.hydra.runtime.choices.experiment == "tiny_smoke"


def test_sentiment_kl_sweep_is_a_learned_reward_ppo_sweep_judged_by_vader():
    cfg = _compose("experiment=sentiment_kl_sweep")
    assert cfg.task.name == "ppo" and cfg.reward._target_.endswith("LearnedReward")
    assert cfg.gold_reward._target_.endswith("VaderReward")
    assert cfg.data.prompts.path.startswith("shipped:sentiment/")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.algorithm.kl.controller._target_.endswith("FixedKLController")
    assert set(cfg.hydra.sweeper.params) == {"algorithm.kl.coef"}
    assert cfg.hydra.sweeper.params["algorithm.kl.coef"].split(",")[0] == "0.0"


def test_sentiment_kl_adaptive_sweeps_the_target_with_a_horizon_that_lets_beta_move():
    cfg = _compose("experiment=sentiment_kl_adaptive")
    assert cfg.reward._target_.endswith("LearnedReward") and cfg.gold_reward is not None
    assert cfg.algorithm.kl.controller._target_.endswith("AdaptiveKLController")
    params = cfg.hydra.sweeper.params
    assert (
        params["algorithm.kl.coef"] == "0.05"
        and len(params["algorithm.kl.controller.target"].split(",")) > 1
    )
    assert "sentiment_kl_adaptive" in cfg.hydra.sweep.dir
    # K_beta = rollouts per iteration / horizon: beta may change by up to 0.2 * K_beta per step.
    k_beta = cfg.budget.rollout_batch_size / cfg.algorithm.kl.controller.horizon
    assert 0.2 * k_beta >= 0.05


def test_optuna_search_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweeper = _compose("hparams_search=ppo_optuna", "task=ppo").hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.storage is None
    assert set(sweeper.params) == {
        "algorithm.kl.coef",
        "algorithm.optimizer.lr",
        "algorithm.policy_loss.clip_low",
    }


@pytest.mark.parametrize(
    ("launcher", "plugin", "field"),
    [
        ("parallel", "hydra_joblib_launcher", "n_jobs"),
        ("slurm", "hydra_submitit_launcher", "gpus_per_node"),
    ],
)
def test_launchers_compose_over_the_plugins(launcher, plugin, field):
    pytest.importorskip(f"hydra_plugins.{plugin}")
    cfg = _compose(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_.startswith(f"hydra_plugins.{plugin}.")
    assert cfg.hydra.launcher[field] is not None


# the real CLI ----------------------------------------------------------------------------------


def _multirun(sweep_dir: Path, *overrides: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlhf_lightning.cli.train", "-m", *overrides]
    cmd.append(f"hydra.sweep.dir={sweep_dir}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ppo_kl_sweep_runs_are_compared_side_by_side(tmp_path, capsys):
    _multirun(tmp_path, *TINY_PPO, "algorithm.kl.coef=0.0,0.2")
    for coef in (0.0, 0.2):
        (run,) = tmp_path.glob(f"*algorithm.kl.coef={coef},*")
        event_dir = run / "tb" / f"algorithm.kl.coef={coef}"  # the run is named by the sweep
        assert _hparams_of(event_dir)["algorithm.kl.coef"] == coef
        assert (run / "policy" / "model.safetensors").is_file()
    rows = _csv_rows(capsys, str(tmp_path), "--metrics", "val/reward,hparams/val/kl")
    assert [r["algorithm.kl.coef"] for r in rows] == ["0.0", "0.2"]
    assert all(r["val/reward"] and r["hparams/val/kl"] for r in rows)

    # The over-optimisation plot script reads the same sweep: one table row per eval per run.
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "kl_sweep" / "plot.py"
    spec = importlib.util.spec_from_file_location("kl_sweep_plot", script)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    plot.main([str(tmp_path), "--out", str(tmp_path / "plots")])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| fixed β=")]
    assert len(lines) == 2 * 3  # 2 runs x (baseline + 2 evals)
    assert {ln.split(" | ")[0] for ln in lines} == {"| fixed β=0", "| fixed β=0.2"}
    assert (tmp_path / "plots" / "reward_vs_kl.png").stat().st_size > 0


@pytest.mark.slow
def test_multirun_over_tasks(tmp_path, capsys):
    _multirun(tmp_path, "experiment=tiny_smoke", "task=reward_model,pipeline")
    rows = _csv_rows(capsys, str(tmp_path))
    assert [r["task"] for r in rows] == ["reward_model", "pipeline"]  # job order
    assert all(r["val/accuracy"] for r in rows) and rows[1]["val/gold_score"]
    for row in rows:
        assert (
            _hparams_of(tmp_path / row["run"] / "tb" / f"task={row['task']}")["task"] == row["task"]
        )


@pytest.mark.slow
def test_optuna_search_maximises_the_task_metric(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    _multirun(tmp_path, "hparams_search=ppo_optuna", *TINY_PPO, "hydra.sweeper.n_trials=2")
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert set(results.best_params) == {
        "algorithm.kl.coef",
        "algorithm.optimizer.lr",
        "algorithm.policy_loss.clip_low",
    }
    rows = _csv_rows(capsys, str(tmp_path), "--metrics", "val/reward")
    assert [r["run"] for r in rows] == ["0", "1"]  # trial numbers; the values name the TB runs
    assert max(float(r["val/reward"]) for r in rows) == pytest.approx(results.best_value)


def test_job_subdir_is_one_safe_directory_name():
    from rlhf_lightning.cli.train import job_subdir

    name = job_subdir(3, "algorithm.kl.coef=0.1,reward.path=outputs/p/rm,x=shipped\\:a/b")
    assert name == "3_algorithm.kl.coef=0.1,reward.path=outputs_p_rm,x=shipped:a_b"
    assert job_subdir(0, "") == "0"
    long = job_subdir(12, "k=" + "v" * 400)
    assert len(long) == 200 and long.startswith("12_k=")


def test_runs_are_listed_in_job_number_order():
    from rlhf_lightning.cli.compare import natural_key

    names = ["10_a=1", "2_a=3", "1_a=2", "0_a=9"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == [
        "0_a=9",
        "1_a=2",
        "2_a=3",
        "10_a=1",
    ]
