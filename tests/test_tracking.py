"""Where runs log (one logger run per stage, sweep runs named by their values), sample tables in
every logger, and the real CLI with the CSV, W&B and MLflow loggers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf

from rlhf_lightning.cli.train import CONF_DIR
from rlhf_lightning.hparams import HPARAMS_RUN
from rlhf_lightning.samples import log_samples, markdown_table
from rlhf_lightning.scalars import read_scalars
from rlhf_lightning.tracking import LOG_DIRS_FILE, SqliteStorageDir, build_logger

TINY_PPO = ["experiment=tiny_smoke", "task=ppo", "reward=token_fraction"]
ROWS = [
    {
        "prompt": "a | b",
        "response": "one\ntwo\r\nthree <b>not bold</b> *x* _y_ `z` [l](u) back\\slash &amp; #h",
        "score": 0.5,
        "kl": 0.1234,
        "gold": None,
    },
    {"prompt": "p", "response": "r", "score": -1.0, "kl": 0.0, "gold": 0.25},
]


def _logger_cfg(name: str):
    """``conf/logger/<name>.yaml`` as the composed config holds it (``${task.name}`` resolved)."""
    root = OmegaConf.create({"task": {"name": "ppo"}})
    root.logger = OmegaConf.load(CONF_DIR / "logger" / f"{name}.yaml")
    return root.logger


def _sweep_job(sweep_dir: Path, num: int, overrides: list[str], params: dict):
    """The Hydra config of job ``num`` of a sweep over ``params``."""
    return OmegaConf.create(
        {
            "mode": "MULTIRUN",
            "sweep": {"dir": str(sweep_dir)},
            "sweeper": {"params": params},
            "overrides": {"task": overrides},
            "job": {
                "num": num,
                "override_dirname": ",".join(sorted(overrides)),
                "config": {"override_dirname": {"kv_sep": "=", "item_sep": ","}},
            },
        }
    )


def _event_dirs(root: Path) -> list[str]:
    """The stages' TensorBoard runs under ``root`` (a stage's final-metrics sub-run in its own)."""
    dirs = {p.parent for p in root.rglob("events.out.*")}
    return sorted(
        {(d.parent if d.name == HPARAMS_RUN else d).relative_to(root).as_posix() for d in dirs}
    )


# where runs log ---------------------------------------------------------------------------------


def test_a_single_run_logs_each_stage_to_its_own_tensorboard_run(tmp_path):
    for value, stage in enumerate(("reward_model", "ppo")):
        logger = build_logger(_logger_cfg("tensorboard"), tmp_path, stage, hydra_cfg=None)
        logger.log_metrics({"val/x": float(value)}, step=0)
        logger.finalize("success")
    assert _event_dirs(tmp_path) == ["tb/ppo", "tb/reward_model"]
    assert not (tmp_path / LOG_DIRS_FILE).exists()


def test_sweep_jobs_log_in_the_sweep_dir_under_distinct_names_of_their_values(tmp_path):
    sweep = tmp_path / "sweep"
    params = {"algorithm.kl.reward.coef": "0.1,0.2"}
    jobs = [  # job 2 repeats job 0's value (an Optuna trial may): it gets its own run
        ["task=ppo", "algorithm.kl.reward.coef=0.1"],
        ["task=ppo", "algorithm.kl.reward.coef=0.2"],
        ["task=ppo", "algorithm.kl.reward.coef=0.1"],
    ]
    for stage in ("reward_model", "ppo"):  # each job's second stage reuses the job's name
        for num, overrides in enumerate(jobs):
            job = _sweep_job(sweep, num, overrides, params)
            logger = build_logger(_logger_cfg("tensorboard"), sweep / f"job{num}", stage, job)
            logger.log_metrics({f"{stage}/job": float(num)}, step=0)
            logger.finalize("success")
    assert _event_dirs(sweep) == [
        f"tb/{name}/{stage}"
        for name in (
            "algorithm.kl.reward.coef=0.1",
            "algorithm.kl.reward.coef=0.1~2",
            "algorithm.kl.reward.coef=0.2",
        )
        for stage in ("ppo", "reward_model")
    ]
    assert (sweep / "job2" / LOG_DIRS_FILE).read_text() == "../tb/algorithm.kl.reward.coef=0.1~2\n"
    for num in range(3):  # a job's scalars are read back through the dirs it recorded
        scalars = read_scalars(sweep / f"job{num}")
        assert scalars == {"reward_model/job": [(0, num)], "ppo/job": [(0, num)]}


def test_a_log_dir_set_in_the_logger_config_is_kept(tmp_path):
    cfg = _logger_cfg("csv")
    cfg.save_dir = str(tmp_path / "elsewhere")
    logger = build_logger(cfg, tmp_path / "run", "ppo", hydra_cfg=None)
    assert Path(logger.log_dir) == tmp_path / "elsewhere" / "csv" / "ppo"


def test_sqlite_storage_dir_is_created_before_the_sweep(tmp_path):
    for storage in (f"sqlite:///{tmp_path}/sweep/optuna.db", None):  # None: nothing to do
        config = OmegaConf.create({"hydra": {"sweeper": {"storage": storage}}})
        SqliteStorageDir().on_multirun_start(config)
    assert (tmp_path / "sweep").is_dir()


# sample tables ----------------------------------------------------------------------------------


class _TableCells(HTMLParser):
    """The text of every cell of an HTML table, row by row (``<br>`` as a newline)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _rendered(markdown: str) -> list[list[str]]:
    """The table cells TensorBoard's text panel shows for ``markdown``."""
    from tensorboard.plugin_util import markdown_to_safe_html

    parser = _TableCells()
    parser.feed(markdown_to_safe_html(markdown))
    return parser.rows


def test_a_markdown_sample_table_renders_every_cell_as_its_text():
    rows = _rendered(markdown_table(ROWS))
    assert rows == [
        ["prompt", "response", "score", "kl", "gold"],
        ["a | b", ROWS[0]["response"].replace("\r\n", "\n"), "0.500", "0.123", ""],
        ["p", "r", "-1.000", "0.000", "0.250"],
    ]


def test_samples_reach_tensorboard_as_a_text_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    logger = TensorBoardLogger(tmp_path, name="tb", version="ppo")
    log_samples(logger, "val/samples", ROWS, step=3)
    logger.finalize("success")
    accumulator = EventAccumulator(logger.log_dir)
    accumulator.Reload()
    (event,) = accumulator.Tensors("val/samples/text_summary")
    assert event.step == 3
    assert tensor_util.make_ndarray(event.tensor_proto).item().decode() == markdown_table(ROWS)


def test_samples_reach_csv_logs_as_json_lines(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="ppo")
    log_samples(logger, "val/samples", ROWS, step=1)
    log_samples(logger, "val/samples", ROWS[1:], step=2)
    lines = (tmp_path / "csv" / "ppo" / "samples" / "val_samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, **ROWS[0]},
        {"step": 1, **ROWS[1]},
        {"step": 2, **ROWS[1]},
    ]


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own settings and caches in the test's tmp dir; afterwards no run left open and no
    W&B service (its address, in ``WANDB_SERVICE``, would take a later subprocess's runs)."""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb_home"
    wandb.finish()
    wandb.teardown()


def test_samples_reach_wandb_as_a_table(tmp_path, wandb_home):
    logger = build_logger(_logger_cfg("wandb"), tmp_path, "ppo", hydra_cfg=None)
    log_samples(logger, "val/samples", ROWS, step=2)
    import wandb

    wandb.finish()
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json")
    assert json.loads(table.read_text()) == {
        "columns": list(ROWS[0]),
        "data": [list(row.values()) for row in ROWS],
    }


def _mlflow_client(run_dir: Path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")


def test_samples_reach_mlflow_as_a_json_lines_artifact(tmp_path):
    client = _mlflow_client(tmp_path)
    logger = build_logger(_logger_cfg("mlflow"), tmp_path, "ppo", hydra_cfg=None)
    log_samples(logger, "val/samples", ROWS, step=1)
    (artifact,) = client.list_artifacts(logger.run_id, "samples")
    assert artifact.path == "samples/val_samples.jsonl"
    local = client.download_artifacts(logger.run_id, artifact.path, str(tmp_path))
    lines = Path(local).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, **row} for row in ROWS]


# the real CLI with each logger ------------------------------------------------------------------


def _train(run_dir: Path, *overrides: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("WANDB_SERVICE", None)  # this process's W&B service would write the run's files
    cmd = [sys.executable, "-m", "rlhf_lightning.cli.train", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_ppo_run_with_the_csv_logger_writes_its_metrics_and_hparams(tmp_path):
    from rlhf_lightning.hardware import resolve_precision

    _train(tmp_path, *TINY_PPO, "logger=csv", "algorithm.kl.reward.coef=0.1")
    with (tmp_path / "csv" / "ppo" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for column in ("step", "val/reward", "val/kl", "objective/score", "kl/sequence"):
        assert column in rows[0], column
    assert [r["val/reward"] for r in rows if r["val/reward"]] and rows[-1]["hparams/val/reward"]
    hparams = yaml.safe_load((tmp_path / "csv" / "ppo" / "hparams.yaml").read_text())
    assert hparams["algorithm.kl.reward.coef"] == 0.1 and hparams["reward"] == "token_fraction"
    # trainer.precision=auto as resolved on this machine (32-true without native bf16)
    assert hparams["trainer.precision"] == resolve_precision("auto", "cpu")
    assert hparams["algorithm.policy_loss.clip_high"] == 0.2  # every value of the algorithm
    assert not any(key.startswith(("rm.", "data.preferences")) for key in hparams)  # not PPO's


def _wandb_records(run_file: Path) -> list:
    """The records of a W&B offline run file: a 7-byte header, then LevelDB-log records (32 KiB
    blocks, each record a 7-byte header + a piece of a ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = (b"" if kind in (1, 2) else chunk) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
    return records


def _wandb_run(run_file: Path) -> dict:
    """Name, id, config and last history values of a W&B offline run."""
    run = {"config": {}, "history": {}}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["id"] = record.run.display_name, record.run.run_id
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                run["history"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return run


@pytest.mark.slow
def test_a_pipeline_with_the_wandb_logger_writes_one_offline_run_per_stage(tmp_path, wandb_home):
    _train(tmp_path, "experiment=tiny_smoke", "task=pipeline", "logger=wandb")
    runs = [_wandb_run(f) for f in sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))]
    assert [r["name"] for r in runs] == ["reward_model", "ppo"]
    assert runs[0]["id"] != runs[1]["id"]
    rm, ppo = runs
    assert "val/accuracy" in rm["history"] and "val/reward" not in rm["history"]
    assert ppo["config"]["algorithm.kl.reward.coef"] == 0.05 and ppo["config"]["rm.lr"] == 5.0e-5
    history = ppo["history"]
    assert history["hparams/val/gold_score"] == pytest.approx(history["val/gold_score"])


@pytest.mark.slow
def test_a_ppo_run_with_the_mlflow_logger_writes_a_local_store(tmp_path):
    client = _mlflow_client(tmp_path)
    _train(tmp_path, *TINY_PPO, "logger=mlflow", "algorithm.kl.reward.coef=0.1")
    (experiment,) = [e for e in client.search_experiments() if e.name == "ppo"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ppo" and run.info.status == "FINISHED"
    assert run.data.params["algorithm.kl.reward.coef"] == "0.1"
    assert run.data.params["reward"] == "token_fraction"
    metrics = run.data.metrics
    assert metrics["hparams/val/reward"] == pytest.approx(metrics["val/reward"])


@pytest.mark.slow
def test_tensorboards_cards_are_the_learning_curves(tmp_path):
    """No ``epoch`` card (Lightning's, one value per iteration) and no one-point cards of final
    metrics: those are dots of the stage's HParams sub-run on the curves' own cards. The KL and
    the score come first: the loss terms and learning rates are ``optim/*``, after them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, *TINY_PPO, "task.eval_every=1", "budget.num_iterations=2")
    cards = {}
    for run in (tmp_path / "tb" / "ppo", tmp_path / "tb" / "ppo" / HPARAMS_RUN):
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        cards[run.name] = {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
    curves, final = cards["ppo"], cards[HPARAMS_RUN]
    assert "epoch" not in curves and not any(tag.startswith("hparams") for tag in curves)
    assert {"objective/score", "kl/sequence", "val/reward"} <= set(curves)
    assert len(curves["objective/score"]) == 2 and len(curves["val/reward"]) == 3  # and iter. 0
    # TensorBoard orders the groups by name: the first two are the KL and the score.
    groups = sorted({tag.split("/")[0] for tag in curves})
    assert groups[:2] == ["kl", "objective"], groups
    assert set(final) <= set(curves)
    # The final value is a dot at the end of its curve: the same step and value.
    last, dot = curves["val/reward"][-1], final["val/reward"][-1]
    assert (dot.step, dot.value) == (last.step, last.value) and last.step == 2
