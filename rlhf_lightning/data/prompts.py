"""Prompts for PPO rollouts: a LightningDataModule yielding one left-padded batch per epoch."""

from __future__ import annotations

import logging
import random
import string
from functools import partial

from torch.utils.data import DataLoader

from rlhf_lightning.data.base import SplitDataModule
from rlhf_lightning.data.padding import pad_token_ids
from rlhf_lightning.data.sampler import RolloutSampler
from rlhf_lightning.data.validation import (
    TOO_LONG,
    BadRow,
    BadRows,
    DataValidationError,
    SourceRow,
    drop_duplicates,
    fit_prompt_length,
    keep_good_rows,
    read_text,
)
from rlhf_lightning.models.loading import apply_chat_template

log = logging.getLogger(__name__)


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Batch of B prompts: input_ids (B, P) and attention_mask (B, P), left-padded; prompts."""
    input_ids, attention_mask = pad_token_ids([item["input_ids"] for item in items], pad_id, "left")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompts": [item["prompt"] for item in items],
    }


class PromptDataModule(SplitDataModule):
    """Prompts from a local file or a hub dataset, validated and tokenised once in `setup`.

    Each row's text goes through: optional random-length token prefix (`prefix_tokens`, seeded
    per row) -> optional `template` (a format string with `{prompt}`) -> with `chat_template`,
    the tokenizer's chat template (one user turn plus the assistant header; the batch's
    `prompts` keep the plain text for reward sources) -> tokenizer (with its special tokens)
    -> `too_long` policy against `max_prompt_length`. Exact duplicate prompts
    are bad rows. Without `eval_path`, `eval_fraction` of the (validated) rows is split off by
    `seed` for evaluation.

    Training yields one batch of `batch_size` prompts per Lightning epoch per rank, chosen by
    `RolloutSampler`; it shards by rank itself, so under DDP build the Trainer with
    `use_distributed_sampler=False`. Validation yields the eval prompts in fixed order, rank `r`
    taking `eval_prompts[r::world_size]`. The tokenizer is switched to left padding.
    """

    what = "prompts"

    def __init__(
        self,
        path: str,
        tokenizer,
        max_prompt_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        split: str = "train",
        text_column: str = "prompt",
        template: str | None = None,
        prefix_tokens: list[int] | None = None,
        eval_path: str | None = None,
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        too_long: str = "truncate_left",
        on_bad_row: str = "error",
        num_workers: int = 0,
        chat_template: bool = False,
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
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
        if min(max_prompt_length, batch_size, eval_batch_size) < 1:
            raise ValueError("max_prompt_length, batch_size and eval_batch_size must be >= 1")
        if template is not None:
            _check_template(template)
        tokenizer.padding_side = "left"
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.text_column = text_column
        self.template = template
        self.prefix_tokens = None if prefix_tokens is None else _check_prefix_tokens(prefix_tokens)
        self.too_long = too_long
        self.chat_template = chat_template

    def train_dataloader(self) -> DataLoader:
        items = self._require_setup(self.train_items)
        rank, world_size = self._rank_and_world_size()
        sampler = RolloutSampler(len(items), self.batch_size, self.seed, rank, world_size)
        return self._loader(items, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        shard = self._require_setup(self.eval_items)[rank::world_size]
        if not shard:
            raise DataValidationError(f"no eval prompts for rank {rank} of {world_size}")
        return self._loader(shard, self.eval_batch_size, sampler=None)

    def _loader(self, items: list[dict], batch_size: int, sampler) -> DataLoader:
        return DataLoader(
            items,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=partial(collate_prompts, pad_id=self.pad_id),
            num_workers=self.num_workers,
        )

    def _make_items(self, rows: list[SourceRow], source: str, bad_rows: BadRows) -> list[dict]:
        texts = keep_good_rows(rows, partial(read_text, column=self.text_column), bad_rows)
        texts = drop_duplicates(texts, key=lambda text: text, bad_rows=bad_rows)
        items = []
        num_truncated = 0
        for row, text in texts:
            try:
                item, truncated = self._encode(row, text)
            except BadRow as bad:  # prompt_too_long under too_long = drop | error
                if self.too_long == "error":
                    raise DataValidationError(f"{row.where()}: {bad.message}") from None
                bad_rows.drop(bad.reason, row.where(), bad.message)
                continue
            num_truncated += truncated
            items.append(item)
        if num_truncated:
            log.warning(
                "%s: cut %d prompts to their last %d tokens",
                source,
                num_truncated,
                self.max_prompt_length,
            )
        return items

    def _encode(self, row: SourceRow, text: str) -> tuple[dict, bool]:
        """(item, whether it was truncated) for one prompt; `BadRow` if too long to keep."""
        if self.prefix_tokens is not None:
            text = self._random_prefix(row, text)
        prompt = text if self.template is None else self.template.format(prompt=text)
        if self.chat_template:  # a user turn + the assistant header; rewards still see `prompt`
            chat = apply_chat_template(self.tokenizer, [prompt])[0]
            token_ids = self.tokenizer(chat, add_special_tokens=False)["input_ids"]
        else:
            token_ids = self.tokenizer(prompt)["input_ids"]
        kept_ids = fit_prompt_length(token_ids, self.max_prompt_length, self.too_long)
        truncated = len(kept_ids) < len(token_ids)
        if truncated:
            prompt = self.tokenizer.decode(kept_ids, skip_special_tokens=True)
        return {"input_ids": kept_ids, "prompt": prompt}, truncated

    def _random_prefix(self, row: SourceRow, text: str) -> str:
        """The first k tokens of `text`, k uniform in `prefix_tokens`, seeded by (seed, row)."""
        low, high = self.prefix_tokens
        num_tokens = random.Random(self.seed * 1_000_003 + row.number).randint(low, high)
        token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(token_ids[:num_tokens])

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        # Lightning would wrap our sampler in a DistributedSampler and shard twice. Its flag is
        # only reachable through a private attribute; skip the check if that ever moves.
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if self.trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "PromptDataModule shards prompts by rank itself: build the Trainer with "
                "use_distributed_sampler=False"
            )
        return self.trainer.global_rank, self.trainer.world_size


def _check_template(template: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"template {template!r} is not a valid format string: {error}") from None
    if fields != {"prompt"}:
        raise ValueError(
            f"template must have {{prompt}} as its only field (write literal braces as {{{{ }}}}), "
            f"got {template!r}"
        )


def _check_prefix_tokens(prefix_tokens) -> tuple[int, int]:
    bounds = tuple(prefix_tokens)
    if len(bounds) != 2 or not all(isinstance(b, int) for b in bounds):
        raise ValueError(f"prefix_tokens must be [min, max] integers, got {prefix_tokens!r}")
    low, high = bounds
    if not 1 <= low <= high:
        raise ValueError(f"prefix_tokens needs 1 <= min <= max, got {prefix_tokens!r}")
    return low, high
