"""Checks of the composed config that ``rlhf-train`` runs before any data or model loads.

Each check raises `ConfigError` naming the key as it is written on the command line
(``trainer.devices``, ``reward._target_``, ``seed``). The task-specific settings
(``algorithm.*``, ``rm.*`` values) are validated by `rlhf_lightning.config`; these checks cover
what that leaves: every interpolation, the Trainer settings, every ``_target_``, ``rm.monitor``
and ``seed``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from rlhf_lightning.config import ConfigError

PRECISIONS = (
    "auto",
    "64-true",
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64",
    "32",
)
CUDA_ACCELERATORS = ("gpu", "cuda")
ACCELERATORS = ("auto", "cpu", *CUDA_ACCELERATORS, "mps", "tpu")

# What RewardModelModule logs (rlhf_lightning/modules/reward_model.py): _step for each split,
# and val/ece at the end of a validation; tests/test_preflight.py checks this list against a
# real training step.
RM_METRIC_NAMES = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin")
RM_METRICS = (
    *(f"{split}/{name}" for split in ("train", "val") for name in RM_METRIC_NAMES),
    "val/ece",
)


def preflight(cfg: DictConfig) -> None:
    """Every check below, in the order a user would fix them."""
    check_interpolations(cfg)
    check_seed(cfg)
    check_trainer(cfg.trainer)
    check_targets(cfg)
    check_rm_monitor(cfg)


def invalid(key: str, reason: str) -> ConfigError:
    """The error for ``key``: ``invalid config: <key>: <reason>``."""
    return ConfigError(f"invalid config: {key}: {reason}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_interpolations(cfg: DictConfig) -> None:
    """Every ``${...}`` in the config resolves (unset ``???`` values are left to the tasks)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except InterpolationResolutionError as error:
        reason = str(error.msg or error).split("\n    full_key:")[0]  # drop OmegaConf's tail
        raise invalid(error.full_key or "config", reason) from error


def check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if not _is_int(seed):
        raise invalid("seed", f"must be an integer, got {seed!r}")


def check_trainer(trainer: DictConfig, cuda_devices: int | None = None) -> None:
    """``trainer.precision``, ``accelerator``, ``devices`` and ``num_nodes``.

    ``cuda_devices``: how many CUDA devices there are (default: ``torch.cuda.device_count()``).
    """
    precision = str(trainer.get("precision", "auto"))
    if precision not in PRECISIONS:
        raise invalid(
            "trainer.precision", f"must be one of {', '.join(PRECISIONS)}; got {precision!r}"
        )
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise invalid(
            "trainer.accelerator", f"must be one of {', '.join(ACCELERATORS)}; got {accelerator!r}"
        )
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = list(devices)
        if not devices or not all(_is_int(d) and d >= 0 for d in devices):
            raise invalid(
                "trainer.devices", f"a list must hold device indices (ints >= 0), got {devices}"
            )
    elif devices != "auto" and not (_is_int(devices) and devices >= 1):
        raise invalid(
            "trainer.devices", f"must be a positive int, 'auto' or a list, got {devices!r}"
        )
    num_nodes = trainer.get("num_nodes", 1)
    if not (_is_int(num_nodes) and num_nodes >= 1):
        raise invalid("trainer.num_nodes", f"must be a positive int, got {num_nodes!r}")

    if accelerator in CUDA_ACCELERATORS:
        available = torch.cuda.device_count() if cuda_devices is None else cuda_devices
        if available == 0:
            raise invalid(
                "trainer.accelerator",
                f"{accelerator!r} needs a CUDA GPU and none is available "
                "(trainer=cpu runs on the CPU)",
            )
        wanted = max(devices) + 1 if isinstance(devices, list) else devices
        if wanted != "auto" and wanted > available:
            raise invalid(
                "trainer.devices",
                f"{devices} needs {wanted} CUDA devices, this machine has {available}",
            )


def walk_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` of every ``_target_`` under ``node`` (plain containers)."""
    if isinstance(node, dict):
        for key, value in node.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield key_path, value
            else:
                yield from walk_targets(value, key_path)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk_targets(value, f"{path}[{index}]")


def locate(path: str) -> Any:
    """The object at the dotted ``path`` (``pkg.module.attr``), importing the longest module
    prefix. Raises ImportError / AttributeError with the reason."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        module_name = ".".join(parts[:end])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue  # this prefix is not a module: try a shorter one
            raise  # the module exists but needs one that is missing
        for attr in parts[end:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"No module named {parts[0]!r}")


def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` in the config names an importable callable."""
    container = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    for key, target in walk_targets(container):
        if not isinstance(target, str) or not target:
            raise invalid(key, f"must be a dotted path (pkg.module.name), got {target!r}")
        if target.startswith("${"):
            continue  # an interpolation: checked where it is resolved
        try:
            obj = locate(target)
        except (ImportError, AttributeError) as error:
            raise invalid(key, f"cannot import {target}: {error}") from error
        if not callable(obj):
            raise invalid(key, f"{target} is not callable")


def check_rm_monitor(cfg: DictConfig) -> None:
    monitor = OmegaConf.select(cfg, "rm.monitor")
    if monitor is not None and monitor not in RM_METRICS:
        metrics = ", ".join(RM_METRICS)
        raise invalid(
            "rm.monitor", f"must be a metric the reward model logs ({metrics}); got {monitor!r}"
        )
