"""Typed views of the config groups that `rlhf_lightning.config` does not cover, and the check of
a ``_target_`` node's arguments against its target's signature.

- ``policy`` (:class:`PolicySource`) and ``reward_backbone`` (:class:`ModelSource`): where a
  model loads from, in what dtype, and the policy's memory / speed options;
- ``paths`` (:class:`Paths`) and ``task`` (:class:`TaskKeys`; the cadence keys are
  `rlhf_lightning.config.Cadence`'s);
- any ``_target_`` node (reward sources, data modules, the logger, the optimizer, the Trainer's
  strategy): :func:`check_target_node`.

`rlhf_lightning.preflight` runs them all before any data or model loads; every error names the
key as it is written on the command line (``policy.dtype``, ``data.prompts.too_long``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from rlhf_lightning.config import (
    ConfigError,
    _build,
    _check,
    _matches,
    _type_name,
    check_fields,
    policy_options_from,
)
from rlhf_lightning.errors import FieldError
from rlhf_lightning.models._util import check_dtype
from rlhf_lightning.models.loading import check_model_name

UNSET = "???"  # a value left unset (``key: ???``), as OmegaConf.to_container gives it


def typed(cls, node: Any, key: str):
    """``cls(**node)`` for dataclass ``cls``: unknown keys, types, required keys and ``cls``'s own
    checks, each error named by its full key under ``key``."""
    _check(isinstance(node, Mapping), key, f"must be a mapping, got {node!r}")
    check_fields(cls, node, key)
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        _check(not required or f.name in node, f"{key}.{f.name}", "required, no value set")
    return _build(cls, node, key)


@dataclass(frozen=True)
class ModelSource:
    """A model to load (``reward_backbone``; ``policy`` is a :class:`PolicySource`)."""

    name_or_path: str
    """``builtin:<name>``, a local directory or ``.gguf`` file, or a hub id."""
    dtype: str = "float32"
    """``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own)."""
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        check_model_name(self.name_or_path)
        check_dtype(self.dtype)


@dataclass(frozen=True)
class PolicySource(ModelSource):
    """The trained policy (``policy``): its source, and the options of
    `rlhf_lightning.config.PolicyOptions` (checked there)."""

    gguf_file: str | None = None
    use_chat_template: bool = False
    lora: dict | None = None
    gradient_checkpointing: bool = False
    compile: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_model_name(self.name_or_path, self.gguf_file)
        options = ("lora", "gradient_checkpointing", "compile")
        policy_options_from({name: getattr(self, name) for name in options})
        if self.compile is not None:
            import torch

            check_arguments(torch.compile, self.compile, "policy.compile", passed=("model",))


@dataclass(frozen=True)
class Paths:
    """Where runs write (``paths``, ``conf/paths/``)."""

    output_root: str
    output_dir: str


@dataclass(frozen=True)
class TaskKeys:
    """What a task is (``task``); its cadence keys are `rlhf_lightning.config.Cadence`'s."""

    name: str
    fn: str
    """The function that runs the task (checked to import by `preflight.check_task`)."""
    metric: str
    """The metric the job returns (Hydra sweepers optimise it)."""


def signature_types(target) -> tuple[inspect.Signature, dict[str, Any]]:
    """The signature of ``target`` (a class: its constructor) and its parameters' resolved
    annotations ({} where they cannot be resolved)."""
    signature = inspect.signature(target)
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # annotations naming what only type checkers import
        hints = {}
    return signature, hints


def check_arguments(
    target, args: Mapping, key: str, nullable: tuple[str, ...] = (), passed: tuple[str, ...] = ()
) -> None:
    """``args``, keyword arguments of ``target`` (at config key ``key``), each error named by
    its full key (``key.<argument>``): each is a parameter of ``target`` (any name where it
    takes ``**kwargs``) that the caller does not pass itself (``passed``), of its annotated type
    (`rlhf_lightning.config._matches`); ``nullable``: parameters that may also be null (the
    caller fills them)."""
    signature, hints = signature_types(target)
    parameters = {name: p for name, p in signature.parameters.items() if name not in passed}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, value in args.items():
        if value == UNSET:
            continue  # the task says so if it needs the value
        _check(
            name in parameters or (takes_any and name not in passed),
            f"{key}.{name}",
            f"unknown key: {_qualified_name(target)} takes {', '.join(parameters) or 'nothing'}",
        )
        if isinstance(value, Mapping) and "_target_" in value:
            # A nested node Hydra builds first (e.g. a reward's answer extractor): its own
            # arguments are checked here; what it builds is known only once built.
            check_target_node(value, f"{key}.{name}")
            continue
        expected = hints.get(name, Any)
        if name in nullable:
            expected = expected | None
        _check(
            _matches(value, expected),
            f"{key}.{name}",
            f"must be {_type_name(expected)}, got {value!r}",
        )


def check_target_node(node: Mapping, key: str, target=None, nullable: tuple[str, ...] = ()) -> None:
    """The arguments of the ``_target_`` node ``node`` (a plain mapping at ``key``), before it
    is built, each error named by its full key (``key.<argument>``): :func:`check_arguments`,
    then the target's own ``check_settings(settings)`` where it has one, given every parameter
    the node sets or defaults (not those the task passes), raises no `FieldError`.

    ``target``: the imported ``_target_`` (default: imported here). Keys starting with ``_``
    (``_target_``, ``_partial_``) are Hydra's (`preflight.check_targets`). Unset values (``???``)
    are left to the task, which reports them when it needs them.
    """
    from hydra.utils import get_object

    target = get_object(node["_target_"]) if target is None else target
    args = {name: value for name, value in node.items() if not str(name).startswith("_")}
    check_arguments(target, args, key, nullable)
    check_settings = getattr(target, "check_settings", None)
    if check_settings is None or UNSET in args.values():
        return
    parameters = inspect.signature(target).parameters
    settings = {
        name: args.get(name, p.default)
        for name, p in parameters.items()
        if name in args or p.default is not p.empty
    }
    try:
        check_settings(settings)
    except FieldError as error:
        raise ConfigError(f"invalid config: {key}.{error.field}: {error.reason}") from None


def _qualified_name(target) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def dataclass_keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.init)
