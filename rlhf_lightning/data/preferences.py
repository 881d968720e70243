"""Preference pairs for reward-model training: chosen and rejected in one batch."""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.base import SplitDataModule
from rlhf_lightning.data.padding import pad_token_ids
from rlhf_lightning.data.sampler import EpochShuffleSampler, ResumableDataLoader
from rlhf_lightning.data.tokenize import encode_text
from rlhf_lightning.data.validation import (
    BadRow,
    BadRows,
    SourceRow,
    drop_duplicates,
    keep_good_rows,
    read_margin,
    read_text,
)

log = logging.getLogger(__name__)


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """Batch of B pairs for one forward pass, right-padded to the longest of all 2B texts.

    input_ids (2B, L) and attention_mask (2B, L): rows 0..B-1 chosen, rows B..2B-1 rejected
    (row i and row B + i are one pair); margin (B,) float32, present only if the items have one.
    """
    sequences = [item["chosen_ids"] for item in items] + [item["rejected_ids"] for item in items]
    input_ids, attention_mask = pad_token_ids(sequences, pad_id, "right")
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "margin" in items[0]:
        batch["margin"] = torch.tensor([item["margin"] for item in items], dtype=torch.float32)
    return batch


class PreferenceDataModule(SplitDataModule):
    """(prompt, chosen, rejected[, margin]) rows, validated and tokenised once in `setup`.

    The scored text is `prompt + joiner + response`, tokenised with the special tokens the
    tokenizer adds (special-token text inside it stays text, `rlhf_lightning.data.tokenize`) and
    cut to its last `max_length` tokens (the reward head reads the last real token, so the end
    of the response must survive). Bad rows: missing column, non-string or blank text, chosen
    identical to rejected, chosen and rejected the same tokens after that cut (`same_tokens`:
    nothing to learn from), non-finite margin, exact duplicates. Without `eval_path`,
    `eval_fraction` of the rows is split off by `seed`.

    Training batches are shuffled by `EpochShuffleSampler` (epoch e's order depends only on
    seed + e, so a resumed run sees the same batches) and served by a `ResumableDataLoader`,
    which also resumes in the middle of an epoch; under DDP Lightning shards them.
    """

    what = "preference pairs"

    def __init__(
        self,
        path: str,
        tokenizer,
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        split: str = "train",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        margin_column: str | None = None,
        joiner: str = "",
        eval_path: str | None = None,
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        on_bad_row: str = "error",
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            path=path,
            tokenizer=tokenizer,
            seed=seed,
            split=split,
            eval_path=eval_path,
            eval_split=eval_split,
            eval_fraction=eval_fraction,
            on_bad_row=on_bad_row,
            num_workers=num_workers,
        )
        if min(max_length, batch_size, eval_batch_size) < 1:
            raise ValueError("max_length, batch_size and eval_batch_size must be >= 1")
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.prompt_column = prompt_column
        self.chosen_column = chosen_column
        self.rejected_column = rejected_column
        self.margin_column = margin_column
        self.joiner = joiner

    def train_dataloader(self) -> DataLoader:
        items = self._require_setup(self.train_items)
        sampler = EpochShuffleSampler(len(items), self.seed)
        return self._loader(items, self.batch_size, sampler, ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require_setup(self.eval_items), self.eval_batch_size, None)

    def train_texts(self) -> list[tuple[str, str]]:
        """(prompt, response) for every chosen, then every rejected response of the train set."""
        items = self._require_setup(self.train_items)
        return [(item["prompt"], item["chosen"]) for item in items] + [
            (item["prompt"], item["rejected"]) for item in items
        ]

    def _loader(self, items: list[dict], batch_size: int, sampler, cls=DataLoader) -> DataLoader:
        return cls(
            items,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=partial(collate_pairs, pad_id=self.pad_id),
            num_workers=self.num_workers,
        )

    def _make_items(self, rows: list[SourceRow], source: str, bad_rows: BadRows) -> list[dict]:
        pairs = keep_good_rows(rows, self._read_pair, bad_rows)
        pairs = drop_duplicates(pairs, key=lambda pair: tuple(pair.values()), bad_rows=bad_rows)
        if not pairs:  # the tokenizer rejects an empty batch; the caller reports "no usable rows"
            return []
        token_ids, num_truncated = self._tokenize([pair for _, pair in pairs])
        items = []
        for (row, pair), (chosen_ids, rejected_ids) in zip(pairs, token_ids, strict=True):
            if chosen_ids == rejected_ids:
                bad_rows.reject("same_tokens", row.where(), self._same_tokens_message(pair))
            else:
                items.append({**pair, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
        if num_truncated:
            log.warning(
                "%s: cut %d texts to their last %d tokens", source, num_truncated, self.max_length
            )
        return items

    def _read_pair(self, row: SourceRow) -> dict:
        pair = {
            "prompt": read_text(row, self.prompt_column),
            "chosen": read_text(row, self.chosen_column),
            "rejected": read_text(row, self.rejected_column),
        }
        if pair["chosen"] == pair["rejected"]:
            raise BadRow("chosen_equals_rejected", "chosen and rejected are the same text")
        if self.margin_column is not None:
            pair["margin"] = read_margin(row, self.margin_column)
        return pair

    def _tokenize(self, pairs: list[dict]) -> tuple[list[tuple[list[int], list[int]]], int]:
        """(chosen ids, rejected ids) per pair, each cut to its last `max_length` tokens, and the
        number of texts cut."""
        token_ids = {}
        num_truncated = 0
        for response in ("chosen", "rejected"):
            texts = [pair["prompt"] + self.joiner + pair[response] for pair in pairs]
            encoded = encode_text(self.tokenizer, texts)
            num_truncated += sum(len(ids) > self.max_length for ids in encoded)
            token_ids[response] = [ids[-self.max_length :] for ids in encoded]
        return list(zip(token_ids["chosen"], token_ids["rejected"], strict=True)), num_truncated

    def _same_tokens_message(self, pair: dict) -> str:
        """Why a pair whose chosen and rejected token ids are equal cannot train the model."""
        texts = [
            pair["prompt"] + self.joiner + pair[response] for response in ("chosen", "rejected")
        ]
        lengths = [len(ids) for ids in encode_text(self.tokenizer, texts)]
        if max(lengths) > self.max_length:
            return (
                f"chosen and rejected are the same tokens once cut to their last max_length="
                f"{self.max_length} tokens (they are {lengths[0]} and {lengths[1]} tokens and "
                "differ only in what is cut); raise max_length or shorten the prompt"
            )
        return "chosen and rejected tokenise to the same tokens"
