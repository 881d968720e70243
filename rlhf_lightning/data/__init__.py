"""Data: prompt and preference-pair datamodules, their validation, and the rollout sampler."""

from rlhf_lightning.data.loading import load_rows, resolve_data_path
from rlhf_lightning.data.preferences import PreferenceDataModule, collate_pairs
from rlhf_lightning.data.prompts import PromptDataModule, collate_prompts
from rlhf_lightning.data.reasoning_gym import ReasoningGymPrompts
from rlhf_lightning.data.sampler import RolloutSampler, stream_indices
from rlhf_lightning.data.validation import DataValidationError

__all__ = [
    "DataValidationError",
    "PreferenceDataModule",
    "PromptDataModule",
    "ReasoningGymPrompts",
    "RolloutSampler",
    "collate_pairs",
    "collate_prompts",
    "load_rows",
    "resolve_data_path",
    "stream_indices",
]
