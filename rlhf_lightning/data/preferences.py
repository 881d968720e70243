"""Preference pairs for reward-model training: chosen and rejected in one batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

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
from rlhf_lightning.errors import require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardTextFormat:
    """How a (prompt, response) pair becomes a reward model's input, at training and at scoring.

    The text is ``prompt + joiner + response``. With a non-empty joiner, whitespace at the start
    of the response is dropped first: the joiner is the separator, so a sampled continuation
    (which starts with the space its first token carries) and the same response stored stripped
    in a preference file give the same text. The text is tokenised with the special tokens the
    tokenizer adds (special-token text inside it stays text, `encode_text`) and cut to its last
    ``max_length`` tokens: the reward head reads the last real token, so the end of the response
    must survive.

    `PreferenceDataModule` builds one from its ``joiner`` and ``max_length``; the reward model
    keeps it and stores it in ``reward_model.json``, and `LearnedReward` scores with the stored
    one, so training and scoring see the same token ids.
    """

    joiner: str = ""
    max_length: int = 512

    def __post_init__(self) -> None:
        if not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if not isinstance(self.joiner, str):
            raise ValueError(f"joiner must be a string, got {self.joiner!r}")

    def text(self, prompt: str, response: str) -> str:
        """The scored text of one pair (see the class doc)."""
        if self.joiner:
            response = response.lstrip()
        return prompt + self.joiner + response

    def uncut_token_ids(
        self, tokenizer, prompts: Sequence[str], responses: Sequence[str]
    ) -> list[list[int]]:
        """Token ids of each pair's text, before the cut to ``max_length``."""
        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        return encode_text(tokenizer, texts) if texts else []

    def cut(self, token_ids: list[int]) -> list[int]:
        """The last ``max_length`` of ``token_ids``."""
        return token_ids[-self.max_length :]

    def token_ids(
        self, tokenizer, prompts: Sequence[str], responses: Sequence[str]
    ) -> list[list[int]]:
        """What the reward model reads for each pair: its text's token ids, cut."""
        return [self.cut(ids) for ids in self.uncut_token_ids(tokenizer, prompts, responses)]


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

    The scored text and its token ids are those of `text_format`, the `RewardTextFormat` of
    `joiner` and `max_length` (the reward model is exported with it). Bad rows: missing column,
    non-string or blank text, chosen identical to rejected, chosen and rejected the same tokens
    after the cut to `max_length` (`same_tokens`: nothing to learn from), non-finite margin,
    exact duplicates. Without `eval_path`, `eval_fraction` of the rows is split off by `seed`.

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
        max_train_rows: int | None = None,
    ) -> None:
        self.check_settings(locals())
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
            max_train_rows=max_train_rows,
        )
        self.text_format = RewardTextFormat(joiner=joiner, max_length=max_length)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.prompt_column = prompt_column
        self.chosen_column = chosen_column
        self.rejected_column = rejected_column
        self.margin_column = margin_column

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        SplitDataModule.check_settings(settings)
        for name in ("max_length", "batch_size", "eval_batch_size"):
            require(settings[name] >= 1, name, f"must be >= 1, got {settings[name]}")

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
                "%s: cut %d texts to their last %d tokens",
                source,
                num_truncated,
                self.text_format.max_length,
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
        fmt = self.text_format
        prompts = [pair["prompt"] for pair in pairs]
        token_ids = {}
        num_truncated = 0
        for response in ("chosen", "rejected"):
            responses = [pair[response] for pair in pairs]
            encoded = fmt.uncut_token_ids(self.tokenizer, prompts, responses)
            num_truncated += sum(len(ids) > fmt.max_length for ids in encoded)
            token_ids[response] = [fmt.cut(ids) for ids in encoded]
        return list(zip(token_ids["chosen"], token_ids["rejected"], strict=True)), num_truncated

    def _same_tokens_message(self, pair: dict) -> str:
        """Why a pair whose chosen and rejected token ids are equal cannot train the model."""
        fmt = self.text_format
        responses = [pair["chosen"], pair["rejected"]]
        encoded = fmt.uncut_token_ids(self.tokenizer, [pair["prompt"]] * 2, responses)
        lengths = [len(ids) for ids in encoded]
        if max(lengths) > fmt.max_length:
            return (
                f"chosen and rejected are the same tokens once cut to their last max_length="
                f"{fmt.max_length} tokens (they are {lengths[0]} and {lengths[1]} tokens and "
                "differ only in what is cut); raise max_length or shorten the prompt"
            )
        return "chosen and rejected tokenise to the same tokens"
