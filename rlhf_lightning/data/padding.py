"""Padding lists of token ids into batch tensors."""

from __future__ import annotations

import torch

PADDING_SIDES = ("left", "right")


def pad_token_ids(
    sequences: list[list[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad B sequences to the longest length L on `side` ("left" or "right").

    Returns input_ids: (B, L) long, attention_mask: (B, L) long with 1 on real tokens.
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"side must be one of {PADDING_SIDES}, got {side!r}")
    if not sequences or any(len(ids) == 0 for ids in sequences):
        raise ValueError("pad_token_ids needs at least one sequence and no empty sequence")
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        columns = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def require_pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id, or a clear error if it has none."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one before building batches "
            "(e.g. tokenizer.pad_token = '<|endoftext|>')"
        )
    return tokenizer.pad_token_id
