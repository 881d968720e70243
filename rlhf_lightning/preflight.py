"""Checks of the composed config that ``rlhf-train`` runs before any data or model loads.

Each check raises `ConfigError` naming the key as it is written on the command line
(``trainer.devices``, ``reward._target_``, ``data.prompts.too_long``). Every value of every
group is checked, whether the task uses the group or not: the typed views of
`rlhf_lightning.config` (``algorithm``, ``budget``, ``generation``, the cadence keys of ``task``,
``rm``) and of `rlhf_lightning.settings` (``policy``, ``reward_backbone``, ``paths``, ``task``),
each ``_target_`` node against its target's signature and ``check_settings`` (``reward``,
``gold_reward``, ``data.*``, ``logger``, ``algorithm.optimizer``, a ``trainer.strategy`` node),
and here: every interpolation, the top-level keys, the Trainer's arguments, every ``_target_``,
``rm.monitor`` and ``task.fn``.

What needs the tokenizer or the data (``generation.stop_token`` is one token, the chat template
exists, ``rm.val_check_interval`` fits in an epoch) is checked by the task right after reading
them, still before any model loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from rlhf_lightning.config import ConfigError, _matches, _type_name

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


# The config groups (conf/config.yaml's defaults list); the other top-level keys are RUN_KEYS.
GROUPS = (
    "policy",
    "reward",
    "reward_backbone",
    "data",
    "algorithm",
    "budget",
    "generation",
    "rm",
    "trainer",
    "logger",
    "paths",
    "task",
)
RUN_KEYS = {
    "seed": int,
    "debug": bool,
    "ckpt_path": str | None,
    "ckpt_force": bool,
    "gold_reward": dict | str | None,
}
SEED_MAX = 2**32 - 1  # the largest seed numpy and Lightning take


def preflight(cfg: DictConfig) -> None:
    """Every check below, in the order a user would fix them."""
    check_interpolations(cfg)
    check_run_keys(cfg)
    if OmegaConf.select(cfg, "task.name") == "pipeline":
        check_learned_reward(cfg)
    check_trainer(cfg.trainer)
    check_targets(cfg)
    check_settings(cfg)
    check_rm_monitor(cfg)


def check_learned_reward(cfg: DictConfig) -> None:
    """The pipeline's PPO stage runs against the reward model it trains (``reward=learned``);
    any other reward source (a rule, a verifier) needs no reward model: ``task=ppo``."""
    from hydra.utils import get_class

    from rlhf_lightning.rewards import LearnedReward

    target = OmegaConf.select(cfg, "reward._target_")
    try:
        learned = issubclass(get_class(target), LearnedReward)
    except Exception:  # not a class that imports: check_targets names reward._target_
        return
    if not learned:
        raise invalid(
            "reward",
            f"task=pipeline trains a reward model and runs PPO against it (reward=learned), "
            f"but reward._target_ is {target}; for PPO against this reward add task=ppo",
        )


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
    if not 0 <= seed <= SEED_MAX:
        raise invalid("seed", f"must be in [0, {SEED_MAX}], got {seed}")


def check_run_keys(cfg: DictConfig) -> None:
    """``seed`` and the other top-level keys that are not groups (``RUN_KEYS``); no others."""
    check_seed(cfg)
    for key in cfg:
        if key in GROUPS or key == "seed":
            continue
        if key not in RUN_KEYS:
            known = ", ".join([*RUN_KEYS, *GROUPS])
            raise invalid(str(key), f"unknown key; the top-level keys are {known}")
        value = OmegaConf.select(cfg, str(key))
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not _matches(value, RUN_KEYS[key]):
            raise invalid(str(key), f"must be {_type_name(RUN_KEYS[key])}, got {value!r}")


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


def walk_targets(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """``(key path, node)`` of every node with a ``_target_`` under ``node`` (plain containers),
    ``node`` itself included."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from walk_targets(value, f"{path}.{key}" if path else str(key))
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


CONVERT_MODES = ("none", "partial", "object", "all")  # Hydra's _convert_


def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` in the config names an importable callable; its node's ``_partial_``
    and ``_recursive_`` are booleans and its ``_convert_`` one of Hydra's modes."""
    container = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    for path, node in walk_targets(container):
        key, target = f"{path}._target_" if path else "_target_", node["_target_"]
        for flag in ("_partial_", "_recursive_"):
            if not isinstance(node.get(flag, False), bool):
                raise invalid(f"{path}.{flag}", f"must be true or false, got {node[flag]!r}")
        if node.get("_convert_", "none") not in CONVERT_MODES:
            modes = ", ".join(CONVERT_MODES)
            raise invalid(f"{path}._convert_", f"must be one of {modes}, got {node['_convert_']!r}")
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


def check_settings(cfg: DictConfig) -> None:
    """Every value of every group (see the module doc), each named by its full key."""
    from rlhf_lightning.config import rl_config_from, rm_config_from
    from rlhf_lightning.settings import ModelSource, Paths, PolicySource, check_target_node, typed

    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    typed(PolicySource, values.get("policy"), "policy")
    typed(ModelSource, values.get("reward_backbone"), "reward_backbone")
    check_reward(values.get("reward"), "reward")
    check_reward(values.get("gold_reward"), "gold_reward")
    for name, node in (values.get("data") or {}).items():
        check_target_node(node, f"data.{name}")
    optimizer = (values.get("algorithm") or {}).get("optimizer")
    if isinstance(optimizer, dict) and "_target_" in optimizer:
        check_target_node(optimizer, "algorithm.optimizer")  # its types; AlgorithmConfig the rest
    rl_config_from(cfg)
    rm_config_from(cfg.rm)
    check_trainer_arguments(values["trainer"])
    if values.get("logger") is not None:
        check_logger(values["logger"])
    typed(Paths, values.get("paths"), "paths")
    check_task(values.get("task"))


def check_reward(node: Any, key: str) -> None:
    """A reward source (``reward``, ``gold_reward``): null, a ``_target_`` node (checked against
    its target), or the import path of a function ``fn(prompts, responses)``."""
    from rlhf_lightning.rewards import import_callable
    from rlhf_lightning.settings import UNSET, check_target_node

    if node is None or node == UNSET:
        return
    if isinstance(node, str):
        try:
            import_callable(node)
        except (ImportError, TypeError, ValueError) as error:
            raise invalid(key, f"cannot use {node!r} as a reward function: {error}") from None
    elif isinstance(node, dict) and "_target_" in node:
        check_target_node(node, key)
    else:
        raise invalid(
            key,
            f"must be a reward source (a node with a _target_, e.g. {key}=vader) or the import "
            f"path of a function fn(prompts, responses), got {node!r}",
        )


def check_trainer_arguments(trainer: dict) -> None:
    """Every key of ``trainer`` is an argument of Lightning's Trainer that the tasks do not set
    themselves, of the type the Trainer annotates; ``log_every_n_steps`` >= 1,
    ``num_sanity_val_steps`` >= -1, and ``strategy`` is a registered name or a ``_target_`` node.
    ``precision``, ``accelerator``, ``devices`` and ``num_nodes`` are :func:`check_trainer`'s."""
    import lightning as L
    from lightning.pytorch.strategies import StrategyRegistry

    from rlhf_lightning.settings import check_target_node, signature_types
    from rlhf_lightning.tasks.common import TASK_TRAINER_ARGS

    signature, hints = signature_types(L.Trainer)
    for name, value in trainer.items():
        key = f"trainer.{name}"
        if name in TASK_TRAINER_ARGS:
            raise invalid(key, "set by the task (see its budget, rm or task settings), not here")
        if name not in signature.parameters:
            raise invalid(key, "unknown key: not an argument of lightning.Trainer")
        if name in ("precision", "accelerator", "devices", "num_nodes"):
            continue
        if name == "strategy" and isinstance(value, dict) and "_target_" in value:
            check_target_node(value, key)
            continue
        if not _matches(value, hints.get(name, Any)):
            raise invalid(key, f"must be {_type_name(hints[name])}, got {value!r}")
    strategy = trainer.get("strategy", "auto")
    names = ("auto", *StrategyRegistry.available_strategies())
    if isinstance(strategy, str) and strategy not in names:
        raise invalid(
            "trainer.strategy", f"unknown strategy {strategy!r}; known: {', '.join(names)}"
        )
    every = trainer.get("log_every_n_steps")
    if every is not None and every < 1:
        raise invalid("trainer.log_every_n_steps", f"must be >= 1, got {every}")
    sanity = trainer.get("num_sanity_val_steps")
    if sanity is not None and sanity < -1:
        raise invalid("trainer.num_sanity_val_steps", f"must be >= -1 (-1: all), got {sanity}")


def check_logger(node: Any) -> None:
    """``logger``: a ``_target_`` node whose arguments fit its class; null where
    `rlhf_lightning.tracking.build_logger` fills them (where to write, the run's name)."""
    from hydra.utils import get_class

    from rlhf_lightning.settings import check_target_node
    from rlhf_lightning.tracking import placed_logger_keys

    if not (isinstance(node, dict) and "_target_" in node):
        raise invalid("logger", f"must be a logger node with a _target_ (or null), got {node!r}")
    target = get_class(node["_target_"])
    check_target_node(node, "logger", target, nullable=placed_logger_keys(target))


def check_task(node: Any) -> None:
    """``task``: its name, function and metric (`rlhf_lightning.settings.TaskKeys`), and no
    keys besides those and the cadence keys (`rlhf_lightning.config.Cadence`, checked there)."""
    from rlhf_lightning.config import Cadence
    from rlhf_lightning.settings import TaskKeys, dataclass_keys, typed

    if not isinstance(node, dict):
        raise invalid("task", f"must be a mapping, got {node!r}")
    cadence = dataclass_keys(Cadence)
    typed(TaskKeys, {k: v for k, v in node.items() if k not in cadence}, "task")
    fn = node["fn"]
    try:
        obj = locate(fn)
    except (ImportError, AttributeError) as error:
        raise invalid("task.fn", f"cannot import {fn}: {error}") from None
    if not callable(obj):
        raise invalid("task.fn", f"{fn} is not callable")


def check_rm_monitor(cfg: DictConfig) -> None:
    monitor = OmegaConf.select(cfg, "rm.monitor")
    if monitor is not None and monitor not in RM_METRICS:
        metrics = ", ".join(RM_METRICS)
        raise invalid(
            "rm.monitor", f"must be a metric the reward model logs ({metrics}); got {monitor!r}"
        )
