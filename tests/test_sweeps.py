"""Studies: run hyper-parameters in TensorBoard's HParams tab, sweeps, ``rlhf-compare``."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from rlhf_lightning.cli import compare
from rlhf_lightning.hparams import ALWAYS_HPARAMS, HPARAMS_RUN, run_hparams
from rlhf_lightning.tracking import run_name
from tests.conftest import compose_config

TINY_PPO = ["experiment=tiny_smoke", "task=ppo", "reward=token_fraction"]


def _compose(*overrides: str):
    return compose_config(overrides, hydra_config=True)


def _hparams_plugin_data(event_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")[tag])


def _hparams_of(event_dir: Path) -> dict:
    """The hparams of the HParams-plugin session start written in ``event_dir``."""
    start = _hparams_plugin_data(event_dir, "_hparams_/session_start_info").session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def _columns_of(event_dir: Path) -> tuple[set[str], list[str]]:
    """The HParams table's columns declared in ``event_dir``: the hparams marked as differing
    between runs, and the metrics in order (each read from the ``HPARAMS_RUN`` sub-run)."""
    experiment = _hparams_plugin_data(event_dir, "_hparams_/experiment").experiment
    differing = {info.name for info in experiment.hparam_infos if info.differs}
    assert {info.name.group for info in experiment.metric_infos} == {HPARAMS_RUN}
    return differing, [info.name.tag for info in experiment.metric_infos]


def _scalar_tags(event_dir: Path) -> dict[str, float]:
    """The last value of every scalar tag written in ``event_dir`` itself (not below)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def _csv_rows(capsys, *argv: str) -> list[dict]:
    assert compare.main([*argv, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


# run_hparams -----------------------------------------------------------------------------------


def test_run_hparams_are_the_overrides_then_the_config_groups_then_every_task_value():
    cfg = _compose(
        "task=ppo", "policy=tiny", "algorithm.kl.reward.coef=0.1", "data.prompts.batch_size=4"
    )
    hparams = run_hparams(cfg, cfg.hydra)
    assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())
    # The group, the command line in its order (every override is a column), then the table.
    assert list(hparams)[:5] == [
        "group",
        "task",
        "policy",
        "algorithm.kl.reward.coef",
        "data.prompts.batch_size",
    ]
    assert (
        hparams["group"]
        == "algorithm.kl.reward.coef=0.1,data.prompts.batch_size=4,policy=tiny,task=ppo"
    )
    assert hparams["task"] == "ppo" and hparams["policy"] == "tiny"  # a group: its choice
    assert hparams["algorithm.kl.reward.coef"] == 0.1 and hparams["data.prompts.batch_size"] == 4
    assert hparams["algorithm"] == "ppo" and hparams["reward"] == "vader"
    assert hparams["algorithm.kl.reward.estimator"] == "k1"
    assert hparams["generation.temperature"] == 0.7 and hparams["seed"] == 42
    assert hparams["algorithm.samples_per_prompt"] == 1
    assert hparams["algorithm/advantage"] == "gae" and hparams["generation"] == "default"
    # Every value of the algorithm is a column, a component by its class name, a null as "null".
    assert hparams["algorithm.advantage._target_"] == "GAE"
    assert hparams["algorithm.policy_loss.clip_low"] == hparams["algorithm.policy_loss.clip_high"]
    assert hparams["algorithm.kl.loss"] == "null" and hparams["gold_reward"] == "null"
    assert "algorithm.optimizer._partial_" not in hparams
    leaves = [k for k in OmegaConf.to_container(cfg.algorithm.policy_loss) if k != "_target_"]
    assert all(f"algorithm.policy_loss.{k}" in hparams for k in leaves)
    assert "algorithm.kl.reward.controller.target" not in hparams  # not in this config
    assert not any(k.startswith(("task.", "rm.", "hydra", "paths", "logger")) for k in hparams)


def test_run_hparams_put_the_swept_keys_first():
    cfg = _compose("task=ppo", "algorithm.kl.reward.coef=0.1", "seed=2")
    with open_dict(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweeper.params = {"seed": "1,2"}
    hparams = run_hparams(cfg, cfg.hydra)
    assert list(hparams)[:4] == ["group", "seed", "task", "algorithm.kl.reward.coef"]
    assert hparams["group"] == "all runs"  # a seed sweep: one group
    with open_dict(cfg.hydra):
        cfg.hydra.sweeper.params = {"seed": "1,2", "algorithm.kl.reward.coef": "0.1,0.2"}
    assert (
        run_hparams(cfg, cfg.hydra)["group"] == "algorithm.kl.reward.coef=0.1"
    )  # the seed left out


def test_run_hparams_follow_the_task():
    # Without Hydra's config: no chosen configs (task, reward_backbone), only values.
    rm = run_hparams(_compose("task=reward_model"))
    assert list(rm)[:2] == ["rm.max_epochs", "rm.lr"] and tuple(rm)[-2:] == ALWAYS_HPARAMS
    assert rm["rm.lr"] == 5.0e-5 and rm["data.preferences.max_length"] == 96
    assert rm["data.preferences._target_"] == "PreferenceDataModule"
    cfg = _compose("task=reward_model")
    rm = run_hparams(cfg, cfg.hydra)
    assert rm["task"] == "reward_model" and rm["reward_backbone"] == "minilm"
    assert rm["data/preferences"] == "sentiment"
    assert not any(k.startswith(("algorithm", "policy", "generation")) for k in rm)
    cfg = _compose("task=pipeline")
    pipeline = run_hparams(cfg, cfg.hydra)
    assert pipeline["rm.lr"] == 5.0e-5 and pipeline["algorithm.kl.reward.coef"] == 0.05
    assert pipeline["reward"] == "learned" and pipeline["gold_reward._target_"] == "VaderReward"


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
    job = ["task=ppo", "seed=2", "algorithm.kl.reward.coef=0.1"]
    assert run_name(_hydra_cfg(tmp_path, "RUN", job)) == ""  # a single run: no sub-dir
    # Swept in the config (an experiment's hydra.sweeper.params, an Optuna search space).
    params = {"algorithm.kl.reward.coef": "0.0,0.1"}
    assert run_name(_hydra_cfg(tmp_path, "MULTIRUN", job, params)) == "algorithm.kl.reward.coef=0.1"
    # Nothing known to be swept: all overrides, as Hydra's override_dirname.
    assert (
        run_name(_hydra_cfg(tmp_path, "MULTIRUN", job))
        == "algorithm.kl.reward.coef=0.1,seed=2,task=ppo"
    )
    # Swept on the command line: read from the multirun.yaml the basic sweeper writes.
    command = ["task=ppo", "seed=1,2", "algorithm.kl.reward.coef=0.0,0.1"]
    OmegaConf.save({"hydra": {"overrides": {"task": command}}}, tmp_path / "multirun.yaml")
    assert run_name(_hydra_cfg(tmp_path, "MULTIRUN", job)) == "algorithm.kl.reward.coef=0.1,seed=2"


# log_final_hparams + rlhf-compare, on real event files -----------------------------------------


def _fake_sweep_job(sweep_dir: Path, job: str, kl_coef: float, rewards: list[float], monkeypatch):
    """A job of a sweep over ``algorithm.kl.reward.coef`` as it leaves its run dir and its
    TensorBoard run: Hydra's files, scalars, and the final hparams logged under the job's Hydra
    config."""
    import lightning as L
    from hydra.core.hydra_config import HydraConfig

    from rlhf_lightning.hparams import log_final_hparams
    from rlhf_lightning.tracking import build_logger

    overrides = ["task=ppo", "policy=tiny", f"algorithm.kl.reward.coef={kl_coef}"]
    cfg = _compose(*overrides)
    with open_dict(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.sweeper.params = {"algorithm.kl.reward.coef": "0.0,0.2"}
        cfg.hydra.job.num = 0
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.masked_copy(cfg, "hydra"))
    run_dir = sweep_dir / job
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(overrides, run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.masked_copy(cfg, ["task"]), run_dir / ".hydra" / "config.yaml")
    logger = build_logger(cfg.logger, run_dir, "ppo")
    for step, reward in enumerate(rewards):
        logger.log_metrics({"val/reward": reward, "train/other": 1.0}, step=step)
    logger.finalize("success")
    trainer = L.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False)
    logged = log_final_hparams(trainer, cfg, {"val/reward": rewards[-1], "val/kl": 0.5})
    assert logged == {"hparams/val/reward": rewards[-1], "hparams/val/kl": 0.5}


def test_final_hparams_reach_tensorboard_and_rlhf_compare(tmp_path, capsys, monkeypatch):
    _fake_sweep_job(tmp_path, "a", 0.0, [0.1, 0.2, 0.3], monkeypatch)
    _fake_sweep_job(tmp_path, "b", 0.2, [0.5, 0.4], monkeypatch)

    event_dir = tmp_path / "tb" / "algorithm.kl.reward.coef=0.0" / "ppo"
    hparams = _hparams_of(event_dir)
    assert hparams["algorithm.kl.reward.coef"] == 0.0 and hparams["task"] == "ppo"
    assert hparams["trainer.precision"] == "32-true"  # what the trainer ran in, not "auto"
    # The HParams tab shows the swept key and the metrics first, without ticking boxes.
    assert hparams["group"] == "algorithm.kl.reward.coef=0.0"
    differing, metrics = _columns_of(event_dir)
    assert differing == {"group", "algorithm.kl.reward.coef"}
    assert metrics == ["val/reward", "val/kl"]  # task.metric first
    # The final values are dots on the learning curves' cards (a sub-run), not cards of their own.
    assert not any(tag.startswith("hparams") for tag in _scalar_tags(event_dir))
    assert _scalar_tags(event_dir / HPARAMS_RUN) == pytest.approx(
        {"val/reward": 0.3, "val/kl": 0.5}
    )

    rows = _csv_rows(capsys, str(tmp_path))
    assert [r["run"] for r in rows] == ["a", "b"]
    assert [r["algorithm.kl.reward.coef"] for r in rows] == [
        "0.0",
        "0.2",
    ]  # the override that differs
    assert "policy" not in rows[0] and "task" not in rows[0]  # the same in every run
    assert [float(r["val/reward"]) for r in rows] == pytest.approx([0.3, 0.4])  # last values
    assert "train/other" not in rows[0]  # default metrics: task.metric and val/*

    rows = _csv_rows(capsys, str(tmp_path), "--metrics", "hparams/val/reward,train/other,nope")
    assert list(rows[0]) == [
        "algorithm.kl.reward.coef",
        "hparams/val/reward",
        "train/other",
        "nope",
        "run",
    ]
    assert rows[0]["nope"] == ""

    assert compare.main([str(tmp_path)]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0] == "| algorithm.kl.reward.coef | val/reward | run |"
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
    assert cfg.algorithm.kl.reward.controller._target_.endswith("FixedKLController")
    assert set(cfg.hydra.sweeper.params) == {"algorithm.kl.reward.coef"}
    assert cfg.hydra.sweeper.params["algorithm.kl.reward.coef"].split(",")[0] == "0.0"


def test_sentiment_kl_adaptive_sweeps_the_target_with_a_horizon_that_lets_beta_move():
    cfg = _compose("experiment=sentiment_kl_adaptive")
    assert cfg.reward._target_.endswith("LearnedReward") and cfg.gold_reward is not None
    assert cfg.algorithm.kl.reward.controller._target_.endswith("AdaptiveKLController")
    params = cfg.hydra.sweeper.params
    assert (
        params["algorithm.kl.reward.coef"] == "0.05"
        and len(params["algorithm.kl.reward.controller.target"].split(",")) > 1
    )
    assert "sentiment_kl_adaptive" in cfg.hydra.sweep.dir
    # K_beta = rollouts per iteration / horizon: beta may change by up to 0.2 * K_beta per step.
    k_beta = cfg.budget.rollout_batch_size / cfg.algorithm.kl.reward.controller.horizon
    assert 0.2 * k_beta >= 0.05


def test_optuna_search_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose("hparams_search=ppo_optuna", "task=ppo")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"  # the study, saved
    assert cfg.hydra.callbacks.sqlite_storage_dir._target_.endswith("SqliteStorageDir")
    assert set(sweeper.params) == {
        "algorithm.kl.reward.coef",
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
    _multirun(tmp_path, *TINY_PPO, "algorithm.kl.reward.coef=0.0,0.2")
    # TensorBoard at the sweep dir: one run per job, named by the swept value.
    runs = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.rglob("events.out.*"))
    assert [r.as_posix() for r in dict.fromkeys(runs)] == [
        "tb/algorithm.kl.reward.coef=0.0/ppo",
        "tb/algorithm.kl.reward.coef=0.0/ppo/hparams",
        "tb/algorithm.kl.reward.coef=0.2/ppo",
        "tb/algorithm.kl.reward.coef=0.2/ppo/hparams",
    ]
    for coef in (0.0, 0.2):
        (run,) = tmp_path.glob(f"*algorithm.kl.reward.coef={coef},*")
        event_dir = tmp_path / "tb" / f"algorithm.kl.reward.coef={coef}" / "ppo"
        assert _hparams_of(event_dir)["algorithm.kl.reward.coef"] == coef
        differing, metrics = _columns_of(event_dir)
        assert differing == {"group", "algorithm.kl.reward.coef"}
        assert metrics[:3] == [f"val/{m}" for m in ("reward", "kl", "response_length")]
        assert (run / "policy" / "model.safetensors").is_file()
    rows = _csv_rows(capsys, str(tmp_path), "--metrics", "val/reward,hparams/val/kl")
    assert [r["algorithm.kl.reward.coef"] for r in rows] == ["0.0", "0.2"]
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
def test_a_seed_sweep_is_one_override_and_its_groups_show_in_compare_and_tensorboard(
    tmp_path, capsys
):
    _multirun(tmp_path, *TINY_PPO, "algorithm.kl.reward.coef=0.0,0.2", "seed=0,1")
    groups = _csv_rows(capsys, str(tmp_path), "--table", "groups", "--metrics", "val/reward")
    assert [(g["group"], g["seeds"]) for g in groups] == [
        ("algorithm.kl.reward.coef=0.0", "0 1"),
        ("algorithm.kl.reward.coef=0.2", "0 1"),
    ]
    assert all(" [" in g["val/reward"] for g in groups)  # a mean and its interval
    (pair,) = _csv_rows(capsys, str(tmp_path), "--table", "pairs", "--metrics", "val/reward")
    assert pair["differ"] in ("yes", "no") and 0 <= float(pair["p"]) <= 1
    for coef in (0.0, 0.2):
        for seed in (0, 1):
            event_dir = tmp_path / "tb" / f"algorithm.kl.reward.coef={coef},seed={seed}" / "ppo"
            assert _hparams_of(event_dir)["group"] == f"algorithm.kl.reward.coef={coef}"


@pytest.mark.slow
def test_multirun_over_tasks(tmp_path, capsys):
    _multirun(tmp_path, "experiment=tiny_smoke", "task=reward_model,pipeline")
    rows = _csv_rows(capsys, str(tmp_path))
    assert [r["task"] for r in rows] == ["reward_model", "pipeline"]  # job order
    assert all(r["val/accuracy"] for r in rows) and rows[1]["val/gold_score"]
    for row, stage in zip(rows, ["reward_model", "ppo"]):  # the pipeline's hparams: after PPO
        assert _hparams_of(tmp_path / "tb" / f"task={row['task']}" / stage)["task"] == row["task"]


def _trials(storage: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial in an Optuna sqlite storage."""
    import sqlite3

    with sqlite3.connect(storage) as db:
        return db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


@pytest.mark.slow
def test_optuna_search_maximises_the_task_metric_and_continues_from_its_storage(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    search = ["hparams_search=ppo_optuna", *TINY_PPO, "hydra.sweeper.n_trials=2"]
    _multirun(tmp_path / "first", *search)
    results = OmegaConf.load(tmp_path / "first" / "optimization_results.yaml")
    assert set(results.best_params) == {
        "algorithm.kl.reward.coef",
        "algorithm.optimizer.lr",
        "algorithm.policy_loss.clip_low",
    }
    rows = _csv_rows(capsys, str(tmp_path / "first"), "--metrics", "val/reward")
    assert [r["run"] for r in rows] == ["0", "1"]  # trial numbers; the values name the TB runs
    assert max(float(r["val/reward"]) for r in rows) == pytest.approx(results.best_value)
    storage = tmp_path / "first" / "optuna.db"
    assert _trials(storage) == [(0, "COMPLETE"), (1, "COMPLETE")]

    # A second invocation continues the study saved there, its trials in a new sweep dir.
    _multirun(tmp_path / "more", *search, f"hydra.sweeper.storage=sqlite:///{storage}")
    assert _trials(storage) == [(n, "COMPLETE") for n in range(4)]
    assert not (tmp_path / "more" / "optuna.db").exists()


def test_job_subdir_is_one_safe_directory_name():
    from rlhf_lightning.cli.train import job_subdir

    name = job_subdir(3, "algorithm.kl.reward.coef=0.1,reward.path=outputs/p/rm,x=shipped\\:a/b")
    assert name == "3_algorithm.kl.reward.coef=0.1,reward.path=outputs_p_rm,x=shipped:a_b"
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
