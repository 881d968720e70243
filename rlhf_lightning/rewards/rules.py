"""Rule-based reward sources: no learned model, no device."""

from __future__ import annotations

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

    def __init__(self, target: str):
        if not isinstance(target, str) or len(target) != 1:
            raise ValueError(f"target must be a single character, got {target!r}")
        self.target = target

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [
            response.count(self.target) / len(response) if response else 0.0
            for response in responses
        ]
