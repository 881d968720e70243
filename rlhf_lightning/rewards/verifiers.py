"""Verifiable rewards: a reasoning-gym generator's own verifier scores the answer of a response.

The answer is taken from the response by an ``extract`` function (``str -> str | None``):

- `first_line` (the default): the response stripped of surrounding whitespace, up to its first
  line break, stripped again. The form the few-shot prompts of
  `rlhf_lightning.data.reasoning_gym` show: ``A: 7`` -> ``"7"``; ``" 7\\nQ: ..."`` -> ``"7"``.
- `last_number`: the last number (``-12``, ``3.5``, ``1,000``) of the first line, for numeric
  answers written inside a sentence: ``"The answer is 7."`` -> ``"7"``.
- `answer_tag`: the text of the last ``<answer>...</answer>`` (reasoning-gym's own
  ``extract_answer``), for prompts that ask for the tags.

A response without an answer (empty, blank, no number, no tags) scores 0 without asking the
verifier; an answer that the verifier cannot parse scores 0 too (a verifier that raises on it
is caught: a malformed answer is the policy's mistake, not the run's).

Score. Many verifiers give part marks: reasoning-gym's default ``score_answer`` gives
``len(reference) / len(answer)`` to an answer that contains the reference, so ``-2`` earns 0.5
for the answer ``2``. By default the reward is therefore 1 for an answer the verifier gives full
marks and 0 otherwise, and its mean is the accuracy; ``partial_credit=True`` passes the
verifier's score through.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence

from rlhf_lightning.rewards.base import RewardError, RewardSource

log = logging.getLogger(__name__)

Extract = Callable[[str], "str | None"]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_line(response: str) -> str | None:
    """The first line of the stripped response, stripped; None if there is none."""
    answer = response.strip().split("\n", 1)[0].strip()
    return answer or None


def last_number(response: str) -> str | None:
    """The last number written in the first line of the response (`first_line`); None if the
    line has none. Commas inside a number are kept (``1,000``; the verifiers strip them)."""
    line = first_line(response)
    numbers = NUMBER.findall(line) if line else []
    return numbers[-1].rstrip(",") if numbers else None


def answer_tag(response: str) -> str | None:
    """The stripped text of the response's last ``<answer>...</answer>``; None if there is
    none or it is blank."""
    from reasoning_gym.utils import extract_answer

    return extract_answer(response) or None


EXTRACTORS: dict[str, Extract] = {fn.__name__: fn for fn in (first_line, last_number, answer_tag)}


class ReasoningGymReward(RewardSource):
    """reasoning-gym's verifier of each prompt's problem applied to the response's answer.

    Reads the ``reasoning_gym`` column of the prompts (`rlhf_lightning.data.reasoning_gym`):
    the generator, difficulty, seed and index of each problem, from which the exact entry is
    regenerated (cached) for ``dataset.score_answer(answer, entry)``. ``extract`` takes the
    answer from a response (module doc); no answer scores 0. The score is 1 where the verifier
    gives full marks, else 0; with ``partial_credit`` the verifier's own score in [0, 1].
    """

    name = "reasoning_gym"

    def __init__(self, extract: Extract = first_line, partial_credit: bool = False) -> None:
        if not callable(extract):
            raise TypeError(f"extract must be a function str -> str | None, got {extract!r}")
        self.extract = extract
        self.partial_credit = partial_credit
        self._datasets: dict[str, object] = {}
        self._entries: dict[str, tuple[object, dict]] = {}

    def score(
        self, prompts: list[str], responses: list[str], reasoning_gym: Sequence[str]
    ) -> list[float]:
        return [
            self.score_one(response, item)
            for response, item in zip(responses, reasoning_gym, strict=True)
        ]

    def score_one(self, response: str, item: str) -> float:
        """The verifier's score of ``response``'s answer to the problem ``item`` (JSON)."""
        dataset, entry = self.entry(item)
        answer = self.extract(response)
        if answer is None:
            return 0.0
        try:
            score = dataset.score_answer(answer, entry)
        except Exception as error:  # the verifier choked on a malformed answer
            log.debug("verifier of %s raised on %r: %s", item, answer, error)
            return 0.0
        score = float(score)
        if not 0.0 <= score <= 1.0:
            raise RewardError(
                f"reward {self.qualified_name}: the verifier of {item} returned {score} for "
                f"{answer!r}, outside [0, 1]"
            )
        return score if self.partial_credit else float(score >= 1.0)

    def entry(self, item: str) -> tuple[object, dict]:
        """(dataset, entry) of a problem named by a ``reasoning_gym`` column value."""
        if item in self._entries:
            return self._entries[item]
        from rlhf_lightning.data.reasoning_gym import create_generator

        try:
            spec = json.loads(item)
            key = json.dumps(
                {"generator": spec["generator"], "difficulty": spec["difficulty"]}, sort_keys=True
            )
            seed, index = int(spec["seed"]), int(spec["index"])
        except (TypeError, ValueError, KeyError) as error:
            raise RewardError(
                f"reward {self.qualified_name}: column 'reasoning_gym' must be a JSON object "
                f"with generator, difficulty, seed and index, got {item!r:.120} ({error})"
            ) from None
        cache_key = f"{key}/{seed}"
        if cache_key not in self._datasets:
            self._datasets[cache_key] = create_generator(
                spec["generator"], spec["difficulty"], seed
            )
        dataset = self._datasets[cache_key]
        self._entries[item] = (dataset, dataset[index])
        return self._entries[item]
