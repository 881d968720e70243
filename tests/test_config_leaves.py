"""A property of the preflight, over every leaf of the composed config of each task: set to a value
of the wrong type, or to a value at or past the usual edges of a range or a set of choices, a
leaf either stops the preflight (what ``rlhf-train`` runs before any data or model loads) with
one ``ConfigError`` line naming that key, or the value is listed in ``ACCEPTED`` with the reason
it is legal. The test walks the config, so a key is covered the day it is added: a new key whose
values pass unchecked fails here until it gets a check (or its value is listed, with the
reason). ``rlhf-train`` prints a ``ConfigError`` as that one line and exits with status 2
(tests/cli/test_user_errors.py runs the command)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
from omegaconf import OmegaConf

from rlhf_lightning.config import ConfigError
from rlhf_lightning.preflight import preflight
from tests.conftest import compose_config

TASKS = ("pipeline", "reward_model", "ppo")


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every leaf of a plain config (lists and empty mappings are leaves)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, node


def probes(value: Any) -> list:
    """Values to try for a leaf whose composed value is ``value``: first of the wrong type, then
    at or past the usual edges (negative, zero, above 1, NaN; an unknown name)."""
    if isinstance(value, bool):
        return ["banana", 1]
    if isinstance(value, int):
        return ["banana", 0.5, -1, 0]
    if isinstance(value, float):
        return ["banana", math.nan, -1.0, 0.0, 1.5]
    if isinstance(value, str):
        return [7, "banana"]
    if value is None:  # of any type: a mapping with an unknown key fits no setting
        return [{"banana": 1}, "banana", -1]
    return ["banana"]  # a list


NAME = "a name, path or text: any string is one (read when the run uses it)"
ZERO = "0 disables it or is a legal value"
# (key, values the preflight accepts, why they are legal). A value listed for a key must be
# accepted, and any other probe of the key must stop the preflight.
ACCEPTED: dict[str, tuple[tuple, str]] = {
    "seed": ((0,), "a seed"),
    "ckpt_path": (("banana",), "a path: the task looks for the checkpoint before any model loads"),
    "policy.name_or_path": (("banana",), "a hub id: loading the tokenizer says if unreachable"),
    "policy.revision": (("banana",), NAME),
    "reward_backbone.name_or_path": (("banana",), "a hub id, as policy.name_or_path"),
    "reward_backbone.revision": (("banana",), NAME),
    "reward.path": (("banana",), "the reward model's directory, read when the reward loads"),
    "generation.stop_token": (
        ("banana",),
        "one token or not depending on the tokenizer: checked once it loads, before any model "
        "(tests/cli/test_user_errors.py)",
    ),
    "generation.temperature": ((1.5,), "any temperature > 0"),
    "generation.top_k": ((0,), ZERO),
    "generation.min_new_tokens": ((0,), ZERO),
    "algorithm.name": (("banana",), NAME),
    "algorithm.advantage.gamma": ((0.0,), "in [0, 1]"),
    "algorithm.advantage.lam": ((0.0,), "in [0, 1]"),
    "algorithm.ent_coef": ((0.0, 1.5), ">= 0"),
    "algorithm.kl.reward.coef": ((0.0, 1.5), ">= 0"),
    "algorithm.max_grad_norm": ((1.5,), "> 0"),
    "algorithm.missing_eos_penalty": ((-1,), "any score"),
    "algorithm.lr_schedule.warmup_ratio": ((0.0,), "in [0, 1)"),
    "algorithm.policy_loss.clip_low": ((1.5,), "> 0"),
    "algorithm.policy_loss.clip_high": ((1.5,), "> 0"),
    "algorithm.value_model.clip": ((1.5,), "> 0"),
    "algorithm.value_model.coef": ((0.0, 1.5), ">= 0 (0 only without a value warm-up)"),
    "algorithm.value_model.lr": ((1.5,), "> 0"),
    "algorithm.value_model.warmup_iterations": ((0,), ZERO),
    "algorithm.optimizer.lr": ((1.5,), "> 0"),
    "algorithm.optimizer.eps": ((1.5,), "> 0"),
    "algorithm.optimizer.weight_decay": ((0.0, 1.5), ">= 0"),
    "rm.lr": ((1.5,), "> 0"),
    "rm.weight_decay": ((0.0, 1.5), ">= 0"),
    "rm.warmup_ratio": ((0.0,), "in [0, 1)"),
    "rm.histogram_every_n_steps": ((0,), ZERO),
    "rm.gradient_clip_val": ((1.5,), "> 0"),
    "trainer.num_sanity_val_steps": ((-1, 0), "-1: every validation batch; 0: none"),
    "logger.name": (("banana",), NAME),
    "logger.save_dir": (("banana",), NAME),
    "logger.version": (("banana", -1), "a run name or number"),
    "paths.output_root": (("banana",), NAME),
    "paths.output_dir": (("banana",), NAME),
    "task.name": (("banana",), NAME),
    "task.metric": (("banana",), "any metric name; one the task does not log gives no value"),
    "task.eval_every": ((0,), ZERO),
    "task.sample_table_every": ((0,), ZERO),
}
for group in ("prompts", "preferences"):
    ACCEPTED.update(
        {
            f"data.{group}.{key}": (("banana",), NAME)
            for key in ("path", "split", "eval_path", "eval_split")
        }
    )
    ACCEPTED[f"data.{group}.seed"] = ((0,), "a seed")
    ACCEPTED[f"data.{group}.num_workers"] = ((0,), "0: no worker processes")
for key in ("text_column", "messages_column"):
    ACCEPTED[f"data.prompts.{key}"] = (("banana",), "a column name: each row must have it")
for key in ("prompt_column", "chosen_column", "rejected_column", "margin_column", "joiner"):
    ACCEPTED[f"data.preferences.{key}"] = (("banana",), NAME)


def is_listed(key: str, value: Any) -> bool:
    listed = ACCEPTED.get(key, ((), ""))[0]
    return any(value == v and type(value) is type(v) for v in listed)


def composed(task: str, *overrides: str):
    return compose_config([f"task={task}", "paths.output_dir=/tmp/unused", *overrides])


def unexpected_outcomes(cfg) -> list[str]:
    """Every (leaf, probe) whose outcome breaks the property, as a line saying what happened."""
    preflight(cfg)  # the composed config itself passes
    found = []
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=True)):
        for probe in probes(value):
            probed = copy.deepcopy(cfg)
            OmegaConf.update(probed, key, probe, merge=False)
            try:
                preflight(probed)
            except ConfigError as error:
                message = str(error)
                names_key = message.startswith(
                    (f"invalid config: {key}:", f"invalid config: {key}.")
                )
                if not names_key or "\n" in message:
                    found.append(f"{key}={probe!r}: not one line naming the key: {message!r}")
                elif is_listed(key, probe):
                    found.append(f"{key}={probe!r}: listed in ACCEPTED, but {message!r}")
                continue
            if not is_listed(key, probe):
                found.append(f"{key}={probe!r}: accepted, and not listed in ACCEPTED")
    return found


@pytest.mark.parametrize("task", TASKS)
def test_every_leaf_is_checked_where_the_user_wrote_it(task):
    found = unexpected_outcomes(composed(task))
    assert not found, "\n".join(found)


def every_keyword(prompts, responses, **settings):
    """A reward function that takes any keyword argument: its settings have no type."""
    return [0.0] * len(responses)


def test_a_key_without_a_check_is_reported():
    """The property catches a key that nothing checks: an argument of a reward function that
    takes ``**settings`` (no annotated type, no range)."""
    cfg = composed(
        "ppo",
        f"reward._target_={__name__}.every_keyword",
        "+reward._partial_=true",
        "+reward.scale=2.0",
    )
    found = unexpected_outcomes(cfg)
    assert [line.split(":")[0] for line in found] == [
        "reward.scale='banana'",
        "reward.scale=nan",
        "reward.scale=-1.0",
        "reward.scale=0.0",
        "reward.scale=1.5",
    ]
