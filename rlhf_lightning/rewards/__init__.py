"""Reward sources: text in, one float32 score per response out (CPU, no grad)."""

from rlhf_lightning.rewards.base import (
    CallableReward,
    RewardError,
    RewardSource,
    as_reward_tensor,
    build_reward,
    import_callable,
)
from rlhf_lightning.rewards.model_rewards import ClassifierReward, LearnedReward
from rlhf_lightning.rewards.rules import TokenFractionReward, VaderReward
from rlhf_lightning.rewards.verifiers import ReasoningGymReward

__all__ = [
    "CallableReward",
    "ClassifierReward",
    "LearnedReward",
    "ReasoningGymReward",
    "RewardError",
    "RewardSource",
    "TokenFractionReward",
    "VaderReward",
    "as_reward_tensor",
    "build_reward",
    "import_callable",
]
