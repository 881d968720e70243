"""Rule-based reward sources: no learned model, no device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf_lightning.errors import require
from rlhf_lightning.rewards.base import RewardSource


class VaderReward(RewardSource):
    """VADER sentiment of the response: the compound score in [-1, 1]. The prompt is ignored,
    so only what the policy wrote is rewarded."""

    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(response)["compound"] for response in responses]


class TokenFractionReward(RewardSource):
    """Toy reward: the fraction of the response's characters equal to `target` (0 when empty).

    With the character tokenizer of `builtin:tiny` this is the fraction of generated tokens that
    are `target`, an easy objective for PPO smoke tests. The prompt is ignored.
    """

    name = "token_fraction"

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """Raise `FieldError` unless ``target`` is one character (run by preflight too)."""
        target = settings["target"]
        require(
            isinstance(target, str) and len(target) == 1,
            "target",
            f"must be a single character, got {target!r}",
        )

    def __init__(self, target: str):
        self.check_settings(locals())
        self.target = target

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [
            response.count(self.target) / len(response) if response else 0.0
            for response in responses
        ]
