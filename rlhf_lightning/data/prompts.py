"""Prompts for PPO rollouts: a LightningDataModule yielding one left-padded batch per epoch."""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Mapping
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from rlhf_lightning.data.base import SplitDataModule
from rlhf_lightning.data.padding import pad_token_ids
from rlhf_lightning.data.sampler import RolloutSampler
from rlhf_lightning.data.tokenize import encode_text, has_chat_template, render_chat
from rlhf_lightning.data.validation import (
    TOO_LONG,
    BadRow,
    BadRows,
    DataValidationError,
    SourceRow,
    drop_duplicates,
    fit_prompt_length,
    keep_good_rows,
    read_messages,
    read_text,
)
from rlhf_lightning.errors import FieldError, require

log = logging.getLogger(__name__)

# Values of a row's other columns that reach the reward as keyword arguments.
COLUMN_TYPES = (str, int, float, bool, type(None))


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Batch of B prompts: input_ids (B, P) and attention_mask (B, P), left-padded; prompts
    (B texts, what reward sources see); columns ({name: B values}, the rows' other columns)."""
    input_ids, attention_mask = pad_token_ids([item["input_ids"] for item in items], pad_id, "left")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompts": [item["prompt"] for item in items],
        "columns": {
            name: [item["columns"][name] for item in items] for name in items[0]["columns"]
        },
    }


class PromptDataModule(SplitDataModule):
    """Prompts from a local file or a hub dataset, validated and tokenised once in `setup`.

    A row holds either a text prompt (`text_column`) or a chat (`messages_column`: a list of
    {"role": "system" | "user" | "assistant", "content": str}, the last from the user); a row
    with both is a bad row. A text prompt goes through: optional random-length token prefix
    (`prefix_tokens`, seeded per row) -> optional `template` (a format string with `{prompt}`)
    -> with `chat_template`, the tokenizer's chat template as one user turn. A chat is always
    rendered with the chat template (`template` and `prefix_tokens` must then be null). The
    template's special tokens are special; the user's text is tokenised without reading
    special-token text in it as special tokens (`rlhf_lightning.data.tokenize`). Then the
    `too_long` policy against `max_prompt_length` applies; a text prompt truncated without a
    chat template becomes the decoded text that is kept (through a chat template, the user's
    text stays as it is).

    The batch's `prompts`, what reward sources see, are the text prompts (after prefix and
    template) or a chat's last user message. The row's other columns with scalar values
    (strings, numbers, booleans, null) travel with it as the batch's `columns`; every item
    carries every such column of the data, None where its row lacks it (logged). Exact
    duplicates (prompt and columns) are bad rows. Without `eval_path`, `eval_fraction` of the
    (validated) rows is split off by `seed` for evaluation.

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
        messages_column: str | None = "messages",
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
        PromptDataModule.check_settings(locals())  # this class's arguments (not a subclass's)
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
        require(
            not chat_template or has_chat_template(tokenizer),
            "chat_template",
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set "
            "use_chat_template: false in the policy config",
        )
        tokenizer.padding_side = "left"
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.text_column = text_column
        self.messages_column = messages_column
        self.template = template
        self.prefix_tokens = None if prefix_tokens is None else tuple(prefix_tokens)
        self.too_long = too_long
        self.chat_template = chat_template
        self.column_names: list[str] = []
        self._unpassed_columns: set[str] = set()  # columns with a list or object value

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        SplitDataModule.check_settings(settings)
        too_long = settings["too_long"]
        choices = ", ".join(TOO_LONG)
        require(too_long in TOO_LONG, "too_long", f"must be one of {choices}, got {too_long!r}")
        for name in ("max_prompt_length", "batch_size", "eval_batch_size"):
            require(settings[name] >= 1, name, f"must be >= 1, got {settings[name]}")
        if settings["template"] is not None:
            _check_template(settings["template"])
        if settings["prefix_tokens"] is not None:
            _check_prefix_tokens(settings["prefix_tokens"])

    def setup(self, stage: str | None = None) -> None:
        if self.train_items is not None:
            return
        super().setup(stage)
        self.column_names = _fill_columns(self.train_items + self.eval_items, self.what)
        if self._unpassed_columns:
            names = ", ".join(repr(name) for name in sorted(self._unpassed_columns))
            log.info("%s: not given to the reward (lists or objects): %s", self.what, names)

    def train_dataloader(self) -> DataLoader:
        items = self._require_setup(self.train_items)
        rank, world_size = self._rank_and_world_size()
        sampler = RolloutSampler(len(items), self.batch_size, self.seed, rank, world_size)
        return self._loader(items, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        self.check_eval_shards(world_size)
        shard = self._require_setup(self.eval_items)[rank::world_size]
        return self._loader(shard, self.eval_batch_size, sampler=None)

    def check_eval_shards(self, world_size: int) -> None:
        """Raise `DataValidationError` unless each of ``world_size`` ranks gets an eval prompt
        (every rank comes to the same answer: none goes on alone)."""
        count = len(self._require_setup(self.eval_items))
        if count < world_size:
            raise DataValidationError(
                f"{self.what}: {count} eval prompts for {world_size} ranks; each rank needs at "
                "least one (add eval prompts, or evaluate less: task.eval_every=0)"
            )

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
        prompts = keep_good_rows(rows, self._read_prompt, bad_rows)
        prompts = drop_duplicates(prompts, key=_duplicate_key, bad_rows=bad_rows)
        items = []
        num_truncated = 0
        for row, prompt in prompts:
            try:
                item, truncated = self._encode(row, prompt)
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

    def _read_prompt(self, row: SourceRow) -> dict:
        """{"text": str} or {"messages": ((role, content), ...)}, plus "columns"; or BadRow."""
        is_chat = self.messages_column is not None and self.messages_column in row.values
        if is_chat and self.text_column in row.values:
            raise BadRow(
                "ambiguous_prompt",
                f"has both {self.text_column!r} and {self.messages_column!r}: which is the "
                "prompt? (keep one, or set messages_column: null)",
            )
        if is_chat:
            prompt = {"messages": read_messages(row, self.messages_column)}
        elif self.text_column in row.values or self.messages_column is None:
            prompt = {"text": read_text(row, self.text_column)}
        else:
            found = ", ".join(repr(name) for name in row.values) or "none"
            message = (
                f"missing column {self.text_column!r} (found columns: {found}; a chat row has "
                f"{self.messages_column!r} instead)"
            )
            raise BadRow("missing_column", message)
        prompt["columns"] = {}
        for name, value in row.values.items():
            if name in (self.text_column, self.messages_column):
                continue
            if isinstance(value, COLUMN_TYPES):
                prompt["columns"][name] = value
            else:
                self._unpassed_columns.add(name)
        return prompt

    def _encode(self, row: SourceRow, prompt: dict) -> tuple[dict, bool]:
        """(item, whether it was truncated) for one prompt; `BadRow` if too long to keep."""
        if "messages" in prompt:
            self._check_chat_row(row)
            messages = [{"role": role, "content": content} for role, content in prompt["messages"]]
            token_ids = render_chat(self.tokenizer, messages).token_ids
            text = messages[-1]["content"]
        else:
            text = prompt["text"]
            if self.prefix_tokens is not None:
                text = self._random_prefix(row, text)
            if self.template is not None:
                text = self.template.format(prompt=text)
            if self.chat_template:
                token_ids = render_chat(
                    self.tokenizer, [{"role": "user", "content": text}]
                ).token_ids
            else:
                token_ids = encode_text(self.tokenizer, [text])[0]
        kept_ids = fit_prompt_length(token_ids, self.max_prompt_length, self.too_long)
        truncated = len(kept_ids) < len(token_ids)
        if truncated and "text" in prompt and not self.chat_template:
            text = self.tokenizer.decode(kept_ids, skip_special_tokens=True)
        return {"input_ids": kept_ids, "prompt": text, "columns": prompt["columns"]}, truncated

    def _check_chat_row(self, row: SourceRow) -> None:
        """Settings that cannot apply to a chat row stop the run (they are not the row's fault)."""
        if self.template is not None or self.prefix_tokens is not None:
            raise DataValidationError(
                f"{row.where()}: a chat ({self.messages_column!r}) row, but template and "
                "prefix_tokens apply to text prompts only; set them to null"
            )
        if not has_chat_template(self.tokenizer):
            raise DataValidationError(
                f"{row.where()}: a chat ({self.messages_column!r}) row, but tokenizer "
                f"{self.tokenizer.name_or_path!r} has no chat template to render it"
            )

    def _random_prefix(self, row: SourceRow, text: str) -> str:
        """The first k tokens of `text`, k uniform in `prefix_tokens`, seeded by (seed, row)."""
        low, high = self.prefix_tokens
        num_tokens = random.Random(self.seed * 1_000_003 + row.number).randint(low, high)
        token_ids = encode_text(self.tokenizer, [text], add_special_tokens=False)[0]
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
        raise FieldError(
            "template", f"{template!r} is not a valid format string: {error}"
        ) from None
    require(
        fields == {"prompt"},
        "template",
        f"must have {{prompt}} as its only field (write literal braces as {{{{ }}}}), got "
        f"{template!r}",
    )


def _check_prefix_tokens(prefix_tokens) -> None:
    bounds = list(prefix_tokens)
    require(
        len(bounds) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds),
        "prefix_tokens",
        f"must be [min, max] integers, got {prefix_tokens!r}",
    )
    require(
        1 <= bounds[0] <= bounds[1],
        "prefix_tokens",
        f"needs 1 <= min <= max, got {prefix_tokens!r}",
    )


def _duplicate_key(prompt: dict) -> tuple:
    """Equal for rows with the same prompt and the same other columns."""
    text = prompt.get("text", prompt.get("messages"))
    return text, tuple(prompt["columns"].items())


def _fill_columns(items: list[dict], what: str) -> list[str]:
    """Give every item every column some item has (None where its row lacks it); the names.

    Logs the columns, and warns about those missing from some rows.
    """
    names = list(dict.fromkeys(name for item in items for name in item["columns"]))
    for name in names:
        missing = sum(name not in item["columns"] for item in items)
        if missing:
            log.warning(
                "%s: column %r is missing, or not a string, number, boolean or null, in %d of %d "
                "rows; those rows give the reward None for it",
                what,
                name,
                missing,
                len(items),
            )
    for item in items:
        item["columns"] = {name: item["columns"].get(name) for name in names}
    if names:
        log.info("%s: columns given to the reward: %s", what, ", ".join(names))
    return names
