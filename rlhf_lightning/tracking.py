"""Runs compared side by side: where loggers write, what the HParams tab shows, sample tables.

Layout (:func:`build_logger`). A run logs each stage (``reward_model``, ``ppo``) as its own
logger run, under the run dir, or under the sweep dir for a sweep's jobs::

    <run dir>/tb/<stage>                               rlhf-train task=ppo | task=pipeline
    <sweep dir>/tb/<what the sweep varies>/<stage>     rlhf-train -m ..., hparams_search=...

so that ``tensorboard --logdir <sweep dir>`` names each run by its swept values
(``tb/algorithm.kl.reward.coef=0.1/ppo``). ``tb`` is the logger config's ``name`` (``csv`` for
the CSV logger). A sweep job records the directories it logs to outside its run dir in
``<run dir>/log_dirs.txt``; :func:`scalar_events` reads them with the run's own.

HParams (:func:`log_final_hparams`). Each task ends by logging the hyper-parameters that matter
(:func:`run_hparams`: the run's ``group``, which names its setting without the seed as
``rlhf-compare`` groups runs, the keys the sweep varies, the command line's overrides, the
chosen config of each group, then every value of the task's ``TASK_SECTIONS``) with the run's
final metrics, declared as the columns of TensorBoard's HParams tab (``group`` and the swept
keys marked as differing, so that they are shown first).

Samples (:func:`log_samples`): a Markdown table in TensorBoard, a table in W&B, JSON lines in the
run's log dir for the other loggers.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

# Hyper-parameters logged for each task after the swept keys and the command-line overrides:
# the chosen config of each of the task's config groups (``algorithm``, ``algorithm/advantage``,
# ``policy``: a name in ``TASK_GROUPS`` covers its subgroups), then every value under the task's
# sections (a ``_target_`` as its class name, a null node as "null"), then ``ALWAYS_HPARAMS``.
# TensorBoard's HParams tab lists the swept keys, then the others by name; it shows the first 5.
TASK_GROUPS = {
    "ppo": (
        "task",
        "trainer",
        "policy",
        "peft",
        "reward",
        "algorithm",
        "budget",
        "generation",
        "data/prompts",
    ),
    "reward_model": ("task", "trainer", "reward_backbone", "rm", "data/preferences"),
}
TASK_GROUPS["pipeline"] = tuple(dict.fromkeys(TASK_GROUPS["ppo"] + TASK_GROUPS["reward_model"]))
TASK_SECTIONS = {
    "ppo": ("algorithm", "budget", "generation", "data.prompts", "gold_reward"),
    "reward_model": ("rm", "data.preferences"),
}
TASK_SECTIONS["pipeline"] = TASK_SECTIONS["ppo"] + TASK_SECTIONS["reward_model"]
ALWAYS_HPARAMS = ("seed", "trainer.precision")
# Final metrics declared as HParams columns after the task's metric (``task.metric``) and before
# every other ``val/*`` one. TensorBoard shows the first five without ticking boxes.
METRIC_COLUMNS = {
    "ppo": (
        "val/reward",
        "val/gold_score",
        "val/kl",
        "val/response_length",
        "objective/rlhf_reward",
        "objective/score",
        "kl/sequence",
        "kl/coef",
    ),
    "reward_model": ("val/accuracy", "val/loss", "val/margin"),
}
METRIC_COLUMNS["pipeline"] = METRIC_COLUMNS["ppo"]
# HParams-table metrics are logged as scalars under this prefix (``hparams/val/reward``), so
# they never add a point to the training curves. TensorBoard keeps them under their own tag in a
# sub-run of the stage's run (``tb/ppo/hparams``): a dot on the learning curve's card, no card
# of its own; reading its events gives them the prefix (:func:`scalar_events`).
METRIC_PREFIX = "hparams/"
HPARAMS_RUN = "hparams"
# In a sweep job's run dir: the directories (relative to it) it logs to in the sweep dir.
LOG_DIRS_FILE = "log_dirs.txt"

_SKIP = object()


# ----------------------------------------------------------------------------- sweeps and names

SEED_KEY = "seed"  # runs that differ only by this override are repeats of one setting
ALL_RUNS = "all runs"  # the group of runs that differ in nothing but the seed


def group_name(values: Mapping[str, Any]) -> str:
    """The name of a group of runs: ``key=value`` of its settings but the seed, sorted and
    comma-separated like a run name (absent keys left out); ``ALL_RUNS`` when none is left.
    ``rlhf-compare`` groups runs by it, and TensorBoard's HParams tab shows it as ``group``."""
    items = sorted(f"{k}={v}" for k, v in values.items() if k != SEED_KEY and v is not None)
    return ",".join(items) or ALL_RUNS


def current_hydra_cfg() -> DictConfig | None:
    """The Hydra config of the running job (None outside ``@hydra.main``, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hydra_cfg: DictConfig | None) -> bool:
    if hydra_cfg is None:
        return False
    mode = hydra_cfg.get("mode")
    return getattr(mode, "name", mode) == "MULTIRUN"


def _override_key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def swept_keys(hydra_cfg: DictConfig) -> set[str]:
    """Keys this job's sweep varies: the sweeper's ``params`` and the command line's sweeps.

    The command line of a basic sweep is read from ``<sweep dir>/multirun.yaml``, which Hydra's
    basic sweeper writes before launching its jobs (``algorithm.kl.reward.coef=0.0,0.1`` there).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    multirun = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if multirun.is_file():
        lines = OmegaConf.select(OmegaConf.load(multirun), "hydra.overrides.task") or []
        overrides = OverridesParser.create().parse_overrides(list(lines))
        keys |= {o.key_or_group for o in overrides if o.is_sweep_override()}
    return keys


def run_name(hydra_cfg: DictConfig | None = None) -> str:
    """This job's run name in its sweep: what the sweep varies, e.g.
    ``algorithm.kl.reward.coef=0.1``.

    Written like Hydra's ``override_dirname`` (sorted, same separators) but holding only the
    swept keys; all overrides when those are unknown; ``/`` becomes ``_`` (one directory name).
    ``""`` outside a sweep. ``hydra_cfg`` defaults to the running job's.
    """
    hydra_cfg = hydra_cfg if hydra_cfg is not None else current_hydra_cfg()
    if not _is_multirun(hydra_cfg):
        return ""
    swept = swept_keys(hydra_cfg)
    lines = [line for line in hydra_cfg.overrides.task if _override_key(line) in swept]
    if not lines:
        name = hydra_cfg.job.override_dirname
    else:
        seps = hydra_cfg.job.config.override_dirname
        name = seps.item_sep.join(sorted(lines)).replace("=", seps.kv_sep)
    return name.replace("/", "_").replace("\\", "")[:200]


# ----------------------------------------------------------------------------- loggers


def recorded_log_dirs(run_dir: str | Path) -> list[Path]:
    """The directories outside ``run_dir`` that its run logged to (``LOG_DIRS_FILE``)."""
    record = Path(run_dir) / LOG_DIRS_FILE
    if not record.is_file():
        return []
    lines = record.read_text().splitlines()
    return list(dict.fromkeys((Path(run_dir) / line).resolve() for line in lines if line))


def _claim_run_dir(run_dir: Path, parent: Path, name: str) -> Path:
    """``parent/name`` for this job: created if free, else ``name~2``, ``name~3``, ... (two jobs
    with the same swept values, e.g. Optuna trials). The job's later stages and a resumed job
    reuse the directory recorded in its run dir."""
    parent = parent.resolve()
    for recorded in recorded_log_dirs(run_dir):
        if recorded.parent == parent:
            return recorded
    for k in itertools.count(1):
        claimed = parent / (name if k == 1 else f"{name}~{k}")
        try:
            claimed.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOG_DIRS_FILE).open("a") as f:
        f.write(Path(os.path.relpath(claimed, run_dir)).as_posix() + "\n")
    return claimed


def placed_logger_keys(target: type) -> tuple[str, ...]:
    """The arguments of logger class ``target`` that `build_logger` fills where the config leaves
    them null."""
    return tuple(_placement(target, Path(), ""))


def _placement(target: type, root: Path, label: str) -> dict[str, Any]:
    """Keyword arguments that tell a Lightning logger class where to write and the run's name."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    if issubclass(target, (TensorBoardLogger, CSVLogger)):
        return {"save_dir": str(root), "version": label}
    if issubclass(target, WandbLogger):
        return {"save_dir": str(root), "name": label or None}
    if issubclass(target, MLFlowLogger):
        return {
            "tracking_uri": f"sqlite:///{root.resolve() / 'mlflow.db'}",
            "artifact_location": str(root.resolve() / "mlruns"),
            "run_name": label or None,
        }
    return {}


def build_logger(
    logger_cfg: DictConfig,
    run_dir: str | Path,
    stage: str | None = None,
    hydra_cfg: DictConfig | None = None,
):
    """The configured Lightning logger for one stage of the run in ``run_dir``.

    Fills the keys that ``logger_cfg`` leaves null: TensorBoard and CSV write to
    ``<root>/<name>/[<run name>/]<stage>``, W&B to ``<root>/wandb`` as run ``[<run name>/]<stage>``,
    MLflow to ``<root>/mlflow.db`` (artifacts in ``<root>/mlruns``); ``root`` is the run dir, or
    the sweep dir for a sweep's job, whose run name is :func:`run_name` (made unique in the sweep
    by :func:`_claim_run_dir`). A W&B run left open by an earlier stage or job is finished first:
    each stage is one W&B run. ``hydra_cfg`` defaults to the running job's.
    """
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    hydra_cfg = hydra_cfg if hydra_cfg is not None else current_hydra_cfg()
    target = get_class(logger_cfg._target_)
    run_dir = Path(run_dir)
    root, name = run_dir, ""
    if _is_multirun(hydra_cfg):
        root = Path(hydra_cfg.sweep.dir).resolve()
        name = run_name(hydra_cfg) or str(hydra_cfg.job.num)
        if issubclass(target, (TensorBoardLogger, CSVLogger)):
            parent = Path(logger_cfg.get("save_dir") or root) / (logger_cfg.get("name") or "")
            name = _claim_run_dir(run_dir, parent, name).name
    label = "/".join(part for part in (name, stage) if part)
    kwargs = {k: v for k, v in _placement(target, root, label).items() if logger_cfg.get(k) is None}
    if issubclass(target, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish()
    return instantiate(logger_cfg, **kwargs)


# ----------------------------------------------------------------------------- hyper-parameters


def _scalar(value: Any) -> bool | int | float | str:
    """A value TensorBoard's HParams accepts: None becomes "null", lists their JSON text."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _hparam_value(cfg: DictConfig, key: str, choices: Mapping, raw: Mapping[str, str]) -> Any:
    """The value of ``key`` as logged: a config group's choice, a class name for ``_target_``,
    a literal; the override's text for a key the config lacks; ``_SKIP`` otherwise."""
    if key in choices:
        return _SKIP if choices[key] is None else choices[key]
    try:
        value = OmegaConf.select(cfg, key, default=_SKIP)
    except Exception:  # an interpolation that does not resolve here
        value = _SKIP
    if value is _SKIP:
        return raw.get(key, _SKIP)
    if isinstance(value, DictConfig):
        return _SKIP
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if key.endswith("._target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return value


def config_values(cfg: DictConfig, section: str) -> dict[str, Any]:
    """Every value under ``section`` of ``cfg`` as ``{dotted.key: value}``, depth first in the
    config's order: a ``_target_`` as its class name, a null node as None, a list as a list;
    ``_partial_`` flags and values that do not resolve here left out. {} without the section."""
    node = OmegaConf.select(cfg, section, default=_SKIP)
    if node is _SKIP:
        return {}
    if not isinstance(node, DictConfig):
        return {section: _hparam_value(cfg, section, {}, {})}
    values: dict[str, Any] = {}
    for name in node:
        key = f"{section}.{name}"
        if name == "_partial_":
            continue
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none():
            values.update(config_values(cfg, key))
            continue
        value = _hparam_value(cfg, key, {}, {})
        if value is not _SKIP:
            values[key] = value
    return values


def run_hparams(cfg: DictConfig, hydra_cfg: DictConfig | None = None) -> dict[str, Any]:
    """The hyper-parameters of a run, as one flat ``{dotted.key: scalar}`` dict, in this order:
    ``group`` (with ``hydra_cfg``: :func:`group_name` of the keys its sweep varies, or outside a
    sweep of its command-line overrides, the seed left out: the runs of a seed sweep share it),
    the keys its sweep varies, its command-line overrides (but the keys Hydra's
    ``override_dirname`` excludes), the chosen config of each group, then
    :func:`config_values` of each of ``TASK_SECTIONS[task]`` and ``ALWAYS_HPARAMS``.
    ``hydra_cfg`` (the job's Hydra config) gives the swept keys, the overrides and the chosen
    config of each group."""
    task = OmegaConf.select(cfg, "task.name")
    keys: list[str] = []
    choices: Mapping = {}
    raw: dict[str, str] = {}
    group = {}
    if hydra_cfg is not None:
        choices = hydra_cfg.runtime.get("choices") or {}
        excluded = set(hydra_cfg.job.config.override_dirname.get("exclude_keys") or [])
        lines = [str(line) for line in hydra_cfg.overrides.get("task") or []]
        raw = {_override_key(line): line.partition("=")[2] for line in lines}
        if _is_multirun(hydra_cfg):
            keys += sorted(swept_keys(hydra_cfg))
        keys += [key for key in raw if key not in excluded]
        grouped = swept_keys(hydra_cfg) if _is_multirun(hydra_cfg) else keys
        group = {"group": group_name({key: raw.get(key) for key in grouped})}
    groups = TASK_GROUPS.get(task, TASK_GROUPS["pipeline"])
    keys += [
        g
        for g, v in choices.items()
        if v is not None and (g in groups or g.split("/")[0] in groups)
    ]
    values = {key: _hparam_value(cfg, key, choices, raw) for key in dict.fromkeys(keys)}
    for section in TASK_SECTIONS.get(task, TASK_SECTIONS["pipeline"]):
        for key, value in config_values(cfg, section).items():
            values.setdefault(key, value)
    for key in ALWAYS_HPARAMS:
        values.setdefault(key, _hparam_value(cfg, key, choices, raw))
    return group | {key: _scalar(v) for key, v in values.items() if v is not _SKIP}


def final_metrics(trainer, cfg: DictConfig, extra: Mapping[str, float | None] = ()) -> dict:
    """The run's final metrics in column order: ``cfg.task.metric``, ``METRIC_COLUMNS`` of the
    task, then every other ``val/*``. Values are the trainer's last, replaced by ``extra``'s."""
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    values.update({k: float(v) for k, v in dict(extra).items() if v is not None})
    task = OmegaConf.select(cfg, "task.name")
    order = [
        OmegaConf.select(cfg, "task.metric"),
        *METRIC_COLUMNS.get(task, ()),
        *sorted(k for k in values if k.startswith("val/")),
    ]
    return {k: values[k] for k in dict.fromkeys(order) if k in values}


def _tensorboard_hparams(logger, params: dict, metrics: dict, step: int, differ: set) -> None:
    """The HParams-plugin records of one run: the experiment (its columns: ``params`` keys,
    those in ``differ`` marked as differing between runs, and ``metrics`` keys), the session
    (``params`` values), and the ``metrics`` values as scalars of the stage's ``HPARAMS_RUN``
    sub-run, under their own tags: on the learning curves' cards, never cards of their own."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    final = SummaryWriter(os.path.join(logger.log_dir, HPARAMS_RUN))
    for tag, value in metrics.items():
        final.add_scalar(tag, value, step)
    final.close()
    experiment, session_start, session_end = hparams(params, metrics)
    plugin_data = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in differ
    for info in data.experiment.metric_infos:
        info.name.group = HPARAMS_RUN
    plugin_data.content = data.SerializeToString()
    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary, step)
    logger.hparams.update(params)  # saved as hparams.yaml


def log_final_hparams(trainer, cfg: DictConfig, metrics: Mapping[str, float | None] = ()) -> dict:
    """Log the run's hyper-parameters (:func:`run_hparams`, with the precision the trainer ran
    in) and final metrics (:func:`final_metrics`) to every logger: TensorBoard's HParams tab,
    the other loggers' params and metrics.

    ``metrics`` (e.g. ``{cfg.task.metric: value main() returns}``) extend or replace the
    trainer's final metrics. Call once per stage run, after fit. Returns the metrics logged
    (with ``METRIC_PREFIX``).
    """
    if not trainer.is_global_zero or not trainer.loggers:
        return {}
    from lightning.pytorch.loggers import TensorBoardLogger

    hydra_cfg = current_hydra_cfg()
    params = run_hparams(cfg, hydra_cfg)
    if "trainer.precision" in params:
        params["trainer.precision"] = str(trainer.precision)
    differ = swept_keys(hydra_cfg) | {"group"} if _is_multirun(hydra_cfg) else set()
    final = final_metrics(trainer, cfg, metrics)
    logged = {METRIC_PREFIX + k: v for k, v in final.items()}
    # The step Lightning logs the curves at (PPO: iterations; the reward model: optimizer steps),
    # so that a final value is a dot at the end of its curve.
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_hparams(logger, params, final, step, differ)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(logged, step=step)
        logger.finalize("success")  # fit closed the writers: flush what was written since
    return logged


class SqliteStorageDir(Callback):
    """Hydra callback: creates the folder of a ``sqlite:///PATH`` sweeper storage (an Optuna
    study's database) before the sweeper opens it; the sweep dir does not exist yet then."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = OmegaConf.select(config, "hydra.sweeper.storage")
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- sample tables

_MARKDOWN_ESCAPES = str.maketrans({c: "\\" + c for c in "\\`*_[]|"})


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell that renders as itself: ``&<>`` as HTML
    entities, Markdown's ``\\ ` * _ [ ] |`` backslash-escaped, line breaks as ``<br>``; floats
    with 3 decimals, None empty."""
    if value is None:
        return ""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    text = html.escape(text, quote=False).translate(_MARKDOWN_ESCAPES)
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``rows``: a column per key (first-seen order), a line per row."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(markdown_cell(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(markdown_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def samples_dir(logger) -> Path | None:
    """Where :func:`log_samples` writes JSON lines for ``logger``: MLflow's local artifact dir of
    the run, else the logger's ``log_dir`` or ``save_dir``; None for a logger with none."""
    from lightning.pytorch.loggers import MLFlowLogger

    if isinstance(logger, MLFlowLogger):
        uri = urlparse(logger.experiment.get_run(logger.run_id).info.artifact_uri)
        return Path(url2pathname(uri.path)) if uri.scheme in ("", "file") else None
    directory = logger.log_dir or logger.save_dir
    return None if directory is None else Path(directory)


def log_samples(logger, tag: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """Log sample completions (``rows``: one dict per sample, e.g. prompt, response, score, kl,
    gold) under ``tag`` at ``step`` in the form ``logger`` shows: TensorBoard a Markdown table
    (text panel), W&B a table (``log_table``), any other logger JSON lines (``step`` + the row)
    appended to ``<samples_dir>/samples/<tag with / as _>.jsonl``. Logs every row given; does
    nothing off global rank 0 or for a logger without a local directory (warned)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

    if not rows or rank_zero_only.rank != 0:
        return
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, markdown_table(rows), step)
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if isinstance(logger, WandbLogger):
        data = [[row.get(c) for c in columns] for row in rows]
        logger.log_table(key=tag, columns=columns, data=data, step=step)
        return
    directory = samples_dir(logger)
    if directory is None:
        rank_zero_warn(f"{type(logger).__name__} has no local directory: samples not logged")
        return
    path = directory / "samples" / f"{tag.replace('/', '_')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")


# ----------------------------------------------------------------------------- reading logs back


def scalar_events(run_dir: str | Path) -> Iterator[tuple[str, int, float, float]]:
    """``(tag, step, wall_time, value)`` of every scalar in the event files of a run: those under
    ``run_dir`` and under the directories it recorded (:func:`recorded_log_dirs`); the final
    metrics of a TensorBoard ``HPARAMS_RUN`` with ``METRIC_PREFIX``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for directory in [Path(run_dir), *recorded_log_dirs(run_dir)]:
        for events in sorted(directory.rglob("events.out.tfevents.*")):
            accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
            accumulator.Reload()
            prefix = METRIC_PREFIX if events.parent.name == HPARAMS_RUN else ""
            for tag in accumulator.Tags()["scalars"]:
                for e in accumulator.Scalars(tag):
                    yield prefix + tag, e.step, e.wall_time, e.value


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run (:func:`scalar_events`): tag -> sorted (step, value).

    Used by the plotting scripts in ``experiments/``.
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    for tag, step, _, value in scalar_events(run_dir):
        scalars.setdefault(tag, []).append((step, value))
    return {tag: sorted(points) for tag, points in scalars.items()}


EVAL_METRICS = ("val/reward", "val/gold_score", "val/kl", "val/response_length")


def eval_rows(scalars: Mapping[str, list[tuple[int, float]]]) -> list[dict[str, float]]:
    """One row per PPO eval: ``iteration`` (0 = before PPO) and the ``val/`` metrics then."""
    by_step: dict[int, dict[str, float]] = {}
    for tag in EVAL_METRICS:
        for step, value in scalars.get(tag, []):
            by_step.setdefault(step, {})[tag] = value
    return [{"iteration": step, **values} for step, values in sorted(by_step.items())]
