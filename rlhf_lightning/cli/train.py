"""``rlhf-train``: the Hydra entry point of every task.

``cfg.task.fn`` names the function that runs the task (``rlhf_lightning.tasks.*.run``); it gets
the composed config and returns the metric named by ``cfg.task.metric``, which the job returns
so that Hydra sweepers (e.g. Optuna) can optimise it. Before the task, `preflight` checks the
config; after it, the job prints the final metrics and where the outputs are.

Errors the user can fix (`UserError`, a missing file, an unset or unresolvable config value,
Hydra's config composition errors) print one line ``error: <message>`` on stderr and exit with
status 2; under ``-m`` each failing job prints its line and the sweep exits with status 2.
``debug=true`` prints the traceback before that line; ``HYDRA_FULL_ERROR=1`` lets every
exception through with its traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from rlhf_lightning.errors import UserError
from rlhf_lightning.preflight import preflight

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# "1" when the user asked for raw tracebacks (HYDRA_FULL_ERROR=1); set once by `main` and
# inherited by the processes a run starts (DDP ranks, launcher workers).
TRACEBACKS_ENV = "RLHF_TRAIN_TRACEBACKS"
# Errors Hydra raises while composing the config from the command line.
HYDRA_CONFIG_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException)


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
    """Check the config, run the task selected by ``cfg.task`` and return its metric."""
    preflight(cfg)
    task_fn = hydra.utils.get_method(cfg.task.fn)
    return task_fn(cfg)


# errors ----------------------------------------------------------------------------------------


class ReportedError(Exception):
    """A job's user error whose message was already printed (the sweep exits with status 2)."""


def omegaconf_message(error: OmegaConfBaseException) -> str:
    """``<full_key>: <what is wrong>`` for an OmegaConf error (without the object type)."""
    key = error.full_key
    if isinstance(error, MissingMandatoryValue) and key:
        return f"{key}: required, no value set (e.g. {key}=...)"
    what = str(error.msg or error).split("\n    full_key:")[0]  # OmegaConf appends key and type
    return f"{key}: {what}" if key else what


def _raised_by_the_call(error: BaseException) -> bool:
    """True for an exception raised where the callable was called (e.g. an unexpected keyword
    argument), not inside it: its traceback ends in the caller's frame."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_call_target"


def user_error_message(error: BaseException) -> str | None:
    """The message of an error the user can fix; None for anything else (a bug of ours).

    User errors: `UserError` (config, data, models, non-finite values), FileNotFoundError,
    OmegaConf's unset (``???``) and unresolvable values, and Hydra's InstantiationException
    when a user error caused it or the config's arguments do not fit the target's signature.
    """
    if isinstance(error, (UserError, FileNotFoundError)):
        return str(error)
    if isinstance(error, (MissingMandatoryValue, InterpolationResolutionError)):
        return omegaconf_message(error)
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        cause = error.__cause__
        if isinstance(cause, TypeError) and _raised_by_the_call(cause):
            full_key = re.search(r"full_key: (\S+)", str(error))  # the node, in Hydra's text
            return f"{full_key.group(1)}: {cause}" if full_key else str(cause)
        return user_error_message(cause)  # a user error names its key or file itself
    return None


def hydra_config_message(error: Exception) -> str:
    """Hydra's text for a command-line or composition error, on one line: the options of a
    missing config, the override that did not parse, the OmegaConf error behind it."""
    if isinstance(error, MissingConfigException) and error.options:
        return f"{str(error).splitlines()[0]} (options: {', '.join(error.options)})"
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, OverrideParseException):
        message = f"{error.override}: {message}"
    if isinstance(error.__cause__, OmegaConfBaseException):
        message += f" ({omegaconf_message(error.__cause__)})"
    return message


def raw_tracebacks() -> bool:
    """Whether the user asked for raw tracebacks (HYDRA_FULL_ERROR=1 when `main` started)."""
    return os.environ.get(TRACEBACKS_ENV, os.environ.get("HYDRA_FULL_ERROR")) == "1"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# noise -----------------------------------------------------------------------------------------

# Warnings about what we do on purpose or cannot change, matched on the start of their message.
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",  # frozen models, on purpose
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning's own code
)
# Log lines that say nothing about the run, by logger, matched on the start of their message.
QUIET_LOG_LINES = {
    "lightning.pytorch.utilities.rank_zero": (
        r"💡 Tip:",  # advertisements
        r"(GPU|TPU|HPU) available: False",  # absent hardware (a used GPU is still reported)
        r"`Trainer\(\w+=[^)]*\)` was configured so",  # echoes of the values the task set
        r"Loading `train_dataloader` to estimate number of stepping batches",
    ),
    # Optuna's sweeper: its storage setup, and the study name Hydra's sweeper logs too
    "alembic.runtime.migration": (r"Context impl ", r"Will assume "),
    "optuna.storages._in_memory": (r"A new study created",),
    "optuna.storages._rdb.storage": (r"A new study created",),
}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``patterns`` (regexes)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def quiet_log_lines() -> None:
    """Filter the log lines listed above (before the libraries are imported: the sweeper's
    lines come before any job)."""
    for name, patterns in QUIET_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))


def quiet_libraries() -> None:
    """One log format (Hydra's, also written to the run dir's log file), no per-load bars, and
    none of the warnings and log lines listed above; every other warning still shows."""
    quiet_log_lines()
    import lightning.pytorch  # noqa: F401  (adds its console handlers on import: drop them)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# the end of a run ------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def tensorboard_dir(cfg: DictConfig) -> Path | None:
    """The TensorBoard directory of the run, if the run wrote one."""
    save_dir = OmegaConf.select(cfg, "logger.save_dir", default=None)
    name = OmegaConf.select(cfg, "logger.name", default=None) or ""
    candidates = [Path(save_dir) / name] if save_dir else []
    candidates.append(Path(cfg.paths.output_dir) / "tb")
    return next((path for path in candidates if path.is_dir()), None)


def outputs_report(cfg: DictConfig, metric: float | None) -> str:
    """What a finished run prints: its metric (the pipeline's summary.json metrics too) and
    where its outputs are."""
    out = Path(cfg.paths.output_dir)
    lines = [f"{cfg.task.name} done: {cfg.task.metric} = {_fmt(metric)}"]
    summary_file = out / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        rm_score = summary.get("reward_model", {}).get("best_score")
        lines.append(f"  reward model: best {cfg.rm.monitor} {_fmt(rm_score)}")
        before, after = summary["ppo"]["before"], summary["ppo"]["after"]
        for key in after:
            lines.append(f"  {key}: {_fmt(before.get(key))} before PPO -> {_fmt(after[key])}")
    lines.append(f"run dir:      {out}")
    for label, name in (
        ("summary", "summary.md"),
        ("policy", "policy"),
        ("reward model", "reward_model"),
        ("checkpoints", "checkpoints"),
    ):
        if (out / name).exists():
            lines.append(f"{label + ':':<14}{out / name}")
    tb = tensorboard_dir(cfg)
    if tb is not None:
        lines.append(f"{'tensorboard:':<14}tensorboard --logdir {tb}")
    return "\n".join(lines)


def is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# entry points ----------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def job(cfg: DictConfig) -> float | None:
    """One Hydra job: run the task, report a user error in one line, print the outputs."""
    quiet_libraries()
    try:
        metric = run(cfg)
    except Exception as error:
        message = user_error_message(error)
        if message is None or raw_tracebacks():
            raise
        if cfg.get("debug"):
            traceback.print_exc()
        # One write per line: under DDP every rank reports, and their lines must not interleave.
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        if is_multirun():
            raise ReportedError(message) from None  # this job fails, the sweep goes on
        raise SystemExit(2) from None
    if is_rank_zero():
        print(outputs_report(cfg, metric), flush=True)
    return metric


def main() -> None:
    """``rlhf-train``: Hydra's command line, errors reported as described in the module doc."""
    os.environ.setdefault(TRACEBACKS_ENV, "1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; the errors are reported here
    quiet_log_lines()
    try:
        job()
    except ReportedError:
        sys.exit(2)
    except HYDRA_CONFIG_ERRORS as error:
        if raw_tracebacks():
            raise
        print(f"error: {hydra_config_message(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
