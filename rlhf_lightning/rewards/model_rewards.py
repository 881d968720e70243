"""Reward sources backed by a transformer: a learned reward model or a sequence classifier.

Both re-tokenise with their own tokenizer, right-padded, cut from the left so that the end of the
response is kept. A learned reward model reads each pair exactly as it was trained to
(`score_pairs`: the joiner and maximum length stored with it); a classifier reads
`prompt + response` (concatenated as is) cut to `max_length` tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from rlhf_lightning.errors import require
from rlhf_lightning.models._util import check_dtype
from rlhf_lightning.models.loading import load_sequence_classifier, load_tokenizer
from rlhf_lightning.models.reward_model import (
    ScalarRewardModel,
    check_scorable,
    encode_for_reward,
    load_reward_tokenizer,
    score_pairs,
)
from rlhf_lightning.rewards.base import RewardSource


class _ModelReward(RewardSource):
    """A model and its tokenizer, scored in batches of `batch_size`; `to` moves the model.

    `check_settings` checks a subclass's constructor arguments (all but the model's files, which
    only loading reads) and raises `FieldError`: the preflight of `rlhf-train` runs it on the
    config (``reward.<setting>``) before anything loads, the constructor runs it first.
    """

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        batch_size = settings["batch_size"]
        require(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        check_dtype(settings["dtype"])

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    def to(self, device: torch.device | str) -> _ModelReward:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


class _TextScorer(_ModelReward):
    """Scores `prompt + response` cut to `max_length` tokens; subclasses implement
    `_score_batch`."""

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        _ModelReward.check_settings(settings)
        max_length = settings["max_length"]
        require(max_length >= 1, "max_length", f"must be >= 1, got {max_length}")

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int, max_length: int):
        super().__init__(model, tokenizer, batch_size)
        self.max_length = min(max_length, tokenizer.model_max_length)

    def _score_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (b, T) -> (b,)"""
        raise NotImplementedError

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [prompt + response for prompt, response in zip(prompts, responses, strict=True)]
        scores = [torch.zeros(0)]
        for start in range(0, len(texts), self.batch_size):
            batch = encode_for_reward(
                self.tokenizer, texts[start : start + self.batch_size], self.max_length
            )
            batch_scores = self._score_batch(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            )
            scores.append(batch_scores.float().cpu())
        return torch.cat(scores)


class LearnedReward(_ModelReward):
    """Score with a reward model saved by `ScalarRewardModel.save_pretrained` (and its tokenizer).

    Each pair is read as in training: the model's stored `text_format` (joiner and maximum
    length, `reward_model.json`) makes the token ids (`score_pairs`). `normalize=True` applies
    the gain and bias stored with the model.
    """

    name = "learned"

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 32,
        normalize: bool = True,
        dtype: str = "float32",
    ):
        self.check_settings(locals())
        model = ScalarRewardModel.from_pretrained(path, dtype=dtype)
        check_scorable(model, path)  # here, not at the first rollout
        super().__init__(model, load_reward_tokenizer(path), batch_size)
        self.path = str(path)
        self.normalize = normalize

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return score_pairs(
            self.model,
            self.tokenizer,
            prompts,
            responses,
            self.batch_size,
            normalize=self.normalize,
            where=self.path,
        )


class ClassifierReward(_TextScorer):
    """The logit of class `label` of a sequence classifier, e.g. POSITIVE of
    `lvwerra/distilbert-imdb` (TRL's IMDB sentiment example)."""

    name = "classifier"

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        label: str = "POSITIVE",
        batch_size: int = 32,
        max_length: int = 512,
        dtype: str = "float32",
        **load_kw,
    ):
        self.check_settings(locals())
        model = load_sequence_classifier(name_or_path, dtype=dtype, **load_kw)
        label2id = model.config.label2id
        if label not in label2id:
            raise ValueError(
                f"label {label!r} is not a class of {name_or_path}; its labels are "
                f"{sorted(label2id)}"
            )
        self.label_id = label2id[label]
        tokenizer = load_tokenizer(name_or_path, padding_side="right", **load_kw)
        if model.config.pad_token_id is None:  # decoder classifiers find the last token by it
            model.config.pad_token_id = tokenizer.pad_token_id
        super().__init__(model, tokenizer, batch_size, max_length)

    def _score_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, self.label_id]
