"""Where a run logs: run names in a sweep, groups of runs, the logger of each stage.

Layout (:func:`build_logger`). A run logs each stage (``reward_model``, ``ppo``) as its own
logger run, under the run dir, or under the sweep dir for a sweep's jobs::

    <run dir>/tb/<stage>                               rlhf-train task=ppo | task=pipeline
    <sweep dir>/tb/<what the sweep varies>/<stage>     rlhf-train -m ..., hparams_search=...

so that ``tensorboard --logdir <sweep dir>`` names each run by its swept values
(``tb/algorithm.kl.reward.coef=0.1/ppo``). ``tb`` is the logger config's ``name`` (``csv`` for
the CSV logger). A sweep job records the directories it logs to outside its run dir in
``<run dir>/log_dirs.txt``; `rlhf_lightning.scalars.scalar_events` reads them with the run's own.

The rest of a run's records: `rlhf_lightning.hparams` (the HParams tab: hyper-parameters and
final metrics), `rlhf_lightning.samples` (sample tables), `rlhf_lightning.scalars` (reading the
scalars back).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# In a sweep job's run dir: the directories (relative to it) it logs to in the sweep dir.
LOG_DIRS_FILE = "log_dirs.txt"


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


def is_multirun(hydra_cfg: DictConfig | None) -> bool:
    if hydra_cfg is None:
        return False
    mode = hydra_cfg.get("mode")
    return getattr(mode, "name", mode) == "MULTIRUN"


def override_key(line: str) -> str:
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
    if not is_multirun(hydra_cfg):
        return ""
    swept = swept_keys(hydra_cfg)
    lines = [line for line in hydra_cfg.overrides.task if override_key(line) in swept]
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
    if is_multirun(hydra_cfg):
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


class SqliteStorageDir(Callback):
    """Hydra callback: creates the folder of a ``sqlite:///PATH`` sweeper storage (an Optuna
    study's database) before the sweeper opens it; the sweep dir does not exist yet then."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = OmegaConf.select(config, "hydra.sweeper.storage")
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
