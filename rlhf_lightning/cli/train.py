"""``rlhf-train``: the Hydra entry point of every task.

``cfg.task.fn`` names the function that runs the task (``rlhf_lightning.tasks.*.run``); it gets
the composed config and returns the metric named by ``cfg.task.metric``, which ``main`` returns
so that Hydra sweepers (e.g. Optuna) can optimise it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def job_subdir(num: int, override_dirname: str) -> str:
    """A sweep job's directory name (``hydra.sweep.subdir``): ``<job number>_<overrides>``.

    Hydra's ``override_dirname`` keeps the ``/`` of path values (``reward.path=outputs/x``),
    which would nest the job several directories deep, escapes ``:`` as ``\\:``, and can exceed
    the 255-character limit of a file name: ``/`` becomes ``_``, escapes are dropped and the name
    is cut at 200 characters; the job number keeps names unique after the cut.
    """
    name = f"{num}_{override_dirname}" if override_dirname else str(num)
    return name.replace("/", "_").replace("\\", "")[:200]


OmegaConf.register_new_resolver("job_subdir", job_subdir, replace=True)


def run(cfg: DictConfig) -> float | None:
    """Run the task selected by ``cfg.task`` and return its metric."""
    task_fn = hydra.utils.get_method(cfg.task.fn)
    return task_fn(cfg)


def quiet_libraries() -> None:
    """One log format (Hydra's, also written to the run dir's log file), no per-load bars."""
    import lightning.pytorch  # noqa: F401  (adds its console handlers on import: drop them)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_libraries()
    return run(cfg)


if __name__ == "__main__":
    main()
