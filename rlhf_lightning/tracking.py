"""Runs compared side by side: hyper-parameters and final metrics in TensorBoard's HParams tab.

Each task ends with :func:`log_final_hparams`: a flat dict of the config values that define the
run (:func:`flatten_hparams`) and the run's key metrics, so that every run of a sweep is one row
of the HParams table when TensorBoard points at the sweep dir. Under a sweep, the TensorBoard run
is named by what the sweep varies (:func:`run_name`, e.g. ``algorithm.kl.coef=0.1``), not
``version_3``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Config groups that define each task's run (a task not listed gets all of them): their chosen
# config (``policy: tiny``) and, for those at the top level of the config, their literal values.
PPO_GROUPS = ("policy", "reward", "algorithm", "kl", "budget", "generation", "data/prompts")
RM_GROUPS = ("reward_backbone", "rm", "data/preferences")
TASK_GROUPS = {
    "ppo": PPO_GROUPS,
    "reward_model": RM_GROUPS,
    "pipeline": (*PPO_GROUPS, *RM_GROUPS, "gold_reward"),
}
ALWAYS_CHOICES = ("experiment", "trainer")
TOP_LEVEL = ("seed", "trainer.precision", "trainer.devices", "trainer.num_nodes")
# Keys that change what is logged or saved, not what is learned.
BOOKKEEPING = {
    "eval_every",
    "eval_batches",
    "sample_table_every",
    "checkpoint_every",
    "histogram_every_n_steps",
    "val_check_interval",
    "monitor",
}
# Metrics beside every ``val/*`` one that go into the HParams table, as logged at the end.
KEY_METRICS = ("objective/score", "objective/rlhf_reward", "kl/sequence", "kl/coef")
# HParams-table metrics are logged as scalars under this prefix (``hparams/val/reward``), so
# they never add a point to the training curves.
METRIC_PREFIX = "hparams/"


def _scalar(value: Any) -> bool | int | float | str:
    """A value TensorBoard's HParams accepts: None becomes "null", lists their JSON text."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _leaves(node: Mapping, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every literal leaf; ``_target_`` gives the short class name.

    Interpolated values (``${...}``) are skipped: they repeat another key (the KL controller's
    ``coef: ${algorithm.kl.coef}``) or a path of this run.
    """
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if key in BOOKKEEPING:
            continue
        if key == "_target_":
            yield path, str(value).rsplit(".", 1)[-1]
        elif isinstance(value, Mapping):
            yield from _leaves(value, path)
        elif isinstance(value, str) and "${" in value:
            continue
        else:
            yield path, value


def _override_key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def flatten_hparams(cfg: DictConfig, hydra_cfg: DictConfig | None = None) -> dict[str, Any]:
    """The config values that define a run, as one flat ``{dotted.key: scalar}`` dict.

    Includes the task name, seed, precision and devices, and every literal leaf of the task's
    groups (``TASK_GROUPS``) except bookkeeping keys. With ``hydra_cfg`` (the job's Hydra
    config) also the chosen config of those groups (``policy: tiny``), the experiment, and
    every command-line override, so that whatever a sweep varies is a column of the table.
    """
    task = OmegaConf.select(cfg, "task.name")
    groups = TASK_GROUPS.get(task, TASK_GROUPS["pipeline"])
    flat: dict[str, Any] = {"task": task}
    for key in TOP_LEVEL:
        flat[key] = OmegaConf.select(cfg, key)
    for group in groups:
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            flat.update(_leaves(OmegaConf.to_container(node, resolve=False), group))
        elif node is not None:
            flat[group] = node
    if hydra_cfg is not None:
        choices = hydra_cfg.runtime.get("choices") or {}
        for group, choice in choices.items():
            if (group in groups or group in ALWAYS_CHOICES) and choice is not None:
                flat[group] = choice
        for line in hydra_cfg.overrides.get("task") or []:
            key, raw = _override_key(line), line.partition("=")[2]
            if key not in flat:
                value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
                flat[key] = value if isinstance(value, (bool, int, float, str)) else raw
    return {key: _scalar(value) for key, value in flat.items()}


def current_hydra_cfg() -> DictConfig | None:
    """The Hydra config of the running job (None outside ``@hydra.main``, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hydra_cfg: DictConfig) -> bool:
    mode = hydra_cfg.get("mode")
    return getattr(mode, "name", mode) == "MULTIRUN"


def swept_keys(hydra_cfg: DictConfig) -> set[str]:
    """Keys this job's sweep varies: the sweeper's ``params`` and the command line's sweeps.

    The command line of a basic sweep is read from ``<sweep dir>/multirun.yaml``, which Hydra's
    basic sweeper writes before launching its jobs (``algorithm.kl.coef=0.0,0.1`` there).
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
    """The TensorBoard run name of this job: what its sweep varies, e.g. ``algorithm.kl.coef=0.1``.

    Written like Hydra's ``override_dirname`` (sorted, same separators) but holding only the
    swept keys; all overrides when those are unknown. ``""`` outside a sweep (a single run's
    logs go straight into ``<run dir>/tb``). ``hydra_cfg`` defaults to the running job's.
    """
    hydra_cfg = hydra_cfg if hydra_cfg is not None else current_hydra_cfg()
    if hydra_cfg is None or not _is_multirun(hydra_cfg):
        return ""
    swept = swept_keys(hydra_cfg)
    lines = [line for line in hydra_cfg.overrides.task if _override_key(line) in swept]
    if not lines:
        return hydra_cfg.job.override_dirname
    seps = hydra_cfg.job.config.override_dirname
    return seps.item_sep.join(sorted(lines)).replace("=", seps.kv_sep)


def final_metrics(trainer, extra: Mapping[str, float | None] = ()) -> dict[str, float]:
    """The trainer's last ``val/*`` and ``KEY_METRICS`` values, updated with ``extra``."""
    metrics = {}
    for name, value in trainer.callback_metrics.items():
        if (name.startswith("val/") or name in KEY_METRICS) and value.numel() == 1:
            metrics[name] = float(value)
    metrics.update({k: float(v) for k, v in dict(extra).items() if v is not None})
    return metrics


def log_final_hparams(trainer, cfg: DictConfig, metrics: Mapping[str, float | None] = ()) -> dict:
    """Log the run's hyper-parameters and final metrics to the HParams tab of every logger.

    ``metrics`` (e.g. ``{cfg.task.metric: value main() returns}``) extend or replace the
    trainer's final key metrics. Call once per run, after fit: TensorBoard shows the first
    HParams record of a run dir. Returns the metrics logged (with ``METRIC_PREFIX``).
    """
    if not trainer.is_global_zero or not trainer.loggers:
        return {}
    from lightning.pytorch.loggers import TensorBoardLogger

    params = flatten_hparams(cfg, current_hydra_cfg())
    logged = {METRIC_PREFIX + k: v for k, v in final_metrics(trainer, metrics).items()}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, logged, step=trainer.global_step)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(logged, step=trainer.global_step)
        logger.finalize("success")  # fit closed the writers: flush what was written since
    return logged


def scalar_events(run_dir: str | Path) -> Iterator[tuple[str, int, float, float]]:
    """``(tag, step, wall_time, value)`` of every scalar in the event files under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for e in accumulator.Scalars(tag):
                yield tag, e.step, e.wall_time, e.value


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every TensorBoard event file under ``run_dir``: tag -> sorted (step, value).

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
