"""Index helpers derived from an attention mask (1 = real token, 0 = padding)."""

from __future__ import annotations

import torch

from rlhf_lightning.ops import last_true_index


def _check_mask(attention_mask: torch.Tensor) -> None:
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate()` uses for left-padded batches.

    attention_mask: (B, T) -> (B, T) long; the first real token of each row gets 0, padding
    before it gets 0 as well (its value does not matter, it is masked).
    """
    _check_mask(attention_mask)
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row; works for left and right padding alike.

    attention_mask: (B, T) -> (B,) long. Raises ValueError if a row has no real token.
    """
    _check_mask(attention_mask)
    return last_true_index(attention_mask)
