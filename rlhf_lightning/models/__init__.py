"""Models: loading (builtin, local dir, GGUF, hub), policy with value head, scalar reward model."""

from rlhf_lightning.models._util import resolve_dtype
from rlhf_lightning.models.convert import convert_gguf_to_hf
from rlhf_lightning.models.loading import (
    ModelNotAvailableError,
    apply_chat_template,
    cache_dir,
    disable_dropout,
    ensure_pad_token,
    load_backbone,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_source,
)
from rlhf_lightning.models.masking import last_token_index, position_ids_from_mask
from rlhf_lightning.models.reward_model import (
    ScalarRewardModel,
    encode_for_reward,
    load_reward_tokenizer,
)
from rlhf_lightning.models.tiny import make_tiny_model_dir
from rlhf_lightning.models.value_head import PolicyWithValueHead

__all__ = [
    "ModelNotAvailableError",
    "PolicyWithValueHead",
    "ScalarRewardModel",
    "apply_chat_template",
    "cache_dir",
    "convert_gguf_to_hf",
    "disable_dropout",
    "encode_for_reward",
    "ensure_pad_token",
    "last_token_index",
    "load_backbone",
    "load_causal_lm",
    "load_reward_tokenizer",
    "load_sequence_classifier",
    "load_tokenizer",
    "make_tiny_model_dir",
    "position_ids_from_mask",
    "resolve_dtype",
    "resolve_model_source",
]
