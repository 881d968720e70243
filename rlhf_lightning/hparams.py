"""What TensorBoard's HParams tab shows for a run: its hyper-parameters and final metrics.

Each task ends by logging (:func:`log_final_hparams`) the hyper-parameters that matter
(:func:`run_hparams`: the run's ``group``, which names its setting without the seed as
``rlhf-compare`` groups runs, the keys the sweep varies, the command line's overrides, the
chosen config of each group, then every value of the task's ``TASK_SECTIONS``) with the run's
final metrics, declared as the columns of the HParams tab (``group`` and the swept keys marked
as differing, so that they are shown first). Other loggers get the same as params and metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf_lightning.tracking import (
    current_hydra_cfg,
    group_name,
    is_multirun,
    override_key,
    swept_keys,
)

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
# of its own; reading its events gives them the prefix (`rlhf_lightning.scalars.scalar_events`).
METRIC_PREFIX = "hparams/"
HPARAMS_RUN = "hparams"
_SKIP = object()


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
        raw = {override_key(line): line.partition("=")[2] for line in lines}
        if is_multirun(hydra_cfg):
            keys += sorted(swept_keys(hydra_cfg))
        keys += [key for key in raw if key not in excluded]
        grouped = swept_keys(hydra_cfg) if is_multirun(hydra_cfg) else keys
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
    differ = swept_keys(hydra_cfg) | {"group"} if is_multirun(hydra_cfg) else set()
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
