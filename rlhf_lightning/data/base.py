"""What the prompt and preference datamodules share: loading, validating and splitting."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from lightning import LightningDataModule

from rlhf_lightning.data.loading import load_rows, resolve_data_path, split_train_eval
from rlhf_lightning.data.padding import require_pad_token_id
from rlhf_lightning.data.validation import ON_BAD_ROW, BadRows, SourceRow, require_rows
from rlhf_lightning.errors import require

log = logging.getLogger(__name__)


class SplitDataModule(LightningDataModule):
    """Loads a train source and an eval source (or a seeded split of the train source) in `setup`.

    Subclasses turn validated rows into items with `_make_items`; one that makes its rows
    itself (generated problems) overrides `_read_splits`. After `setup`, `train_items`
    and `eval_items` hold the items and `skipped` the number of dropped rows per reason.
    `max_train_rows` keeps a seeded random subset of that many training rows (in data order),
    e.g. to train weaker reward models on fewer pairs.

    `check_settings` checks the settings that need no tokenizer and no data; the preflight of
    `rlhf-train` runs it on the config (named ``data.<name>.<setting>``) before anything loads,
    and each subclass's constructor runs it first.
    """

    what = "rows"  # names the data in log messages

    def __init__(
        self,
        path: str,
        tokenizer,
        seed: int,
        split: str,
        eval_path: str | None,
        eval_split: str | None,
        eval_fraction: float,
        on_bad_row: str,
        num_workers: int,
        max_train_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.max_train_rows = max_train_rows
        self.path = path
        self.tokenizer = tokenizer
        self.pad_id = require_pad_token_id(tokenizer)
        self.seed = seed
        self.split = split
        self.eval_path = eval_path
        self.eval_split = eval_split or split
        self.eval_fraction = eval_fraction
        self.on_bad_row = on_bad_row
        self.num_workers = num_workers
        self.train_items: list[dict] | None = None
        self.eval_items: list[dict] | None = None
        self.skipped: dict[str, int] = {}

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """Raise `FieldError` for a setting that cannot work, whatever the data: ``settings``
        holds every constructor argument but the tokenizer (defaults filled in)."""
        policy, choices = settings["on_bad_row"], ", ".join(ON_BAD_ROW)
        require(policy in ON_BAD_ROW, "on_bad_row", f"must be one of {choices}, got {policy!r}")
        fraction = settings["eval_fraction"]
        require(0 < fraction < 1, "eval_fraction", f"must be in (0, 1), got {fraction}")
        rows = settings.get("max_train_rows")
        require(rows is None or rows >= 1, "max_train_rows", f"must be >= 1 (or null), got {rows}")
        workers = settings["num_workers"]
        require(workers >= 0, "num_workers", f"must be >= 0, got {workers}")
        seed = settings["seed"]
        require(seed >= 0, "seed", f"must be >= 0, got {seed}")

    def setup(self, stage: str | None = None) -> None:
        if self.train_items is not None:
            return
        bad_rows = BadRows(self.on_bad_row)
        train, evaluation = self._read_splits(bad_rows)
        if self.max_train_rows is not None and len(train) > self.max_train_rows:
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
            train = [train[i] for i in sorted(keep[: self.max_train_rows].tolist())]
        bad_rows.log_summary(self.what)
        self.skipped = dict(bad_rows.counts)
        self.train_items, self.eval_items = train, evaluation
        log.info("%s: %d train, %d eval", self.what, len(train), len(evaluation))

    def _read_splits(self, bad_rows: BadRows) -> tuple[list[dict], list[dict]]:
        """The (train, eval) items: `path`, and `eval_path` or a seeded split of `path`."""
        train = self._load_source(self.path, self.split, bad_rows)
        if self.eval_path is None:
            return split_train_eval(
                train, self.eval_fraction, self.seed, resolve_data_path(self.path), bad_rows
            )
        return train, self._load_source(self.eval_path, self.eval_split, bad_rows)

    def _load_source(self, path: str, split: str, bad_rows: BadRows) -> list[dict]:
        source = resolve_data_path(path)
        items = self._make_items(load_rows(source, split, bad_rows), source, bad_rows)
        require_rows(items, source, bad_rows)
        return items

    def _make_items(self, rows: list[SourceRow], source: str, bad_rows: BadRows) -> list[dict]:
        """Validate and tokenise the rows of one source, reporting bad ones to `bad_rows`."""
        raise NotImplementedError

    def _require_setup(self, items: list[dict] | None) -> list[dict]:
        if items is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before the dataloaders")
        return items
