"""The arithmetic task's verifiable reward: is the first number of the response the answer?

Used by `conf/experiment/arithmetic.yaml` as a custom reward (``_target_`` + ``_partial_``); the
prompt files' ``answer`` column arrives as the keyword argument ``answer``.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def first_number(text: str) -> int | None:
    """The first integer written in ``text`` (an optional minus sign, then digits), or None."""
    match = NUMBER.search(text)
    return int(match.group()) if match else None


def first_number_correct(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 for each response whose first integer equals the prompt's ``answer``, else 0.0."""
    return [float(first_number(response) == int(a)) for response, a in zip(responses, answer)]
