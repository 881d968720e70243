"""The reward model reads a (prompt, response) pair the same way at training and at scoring: one
`RewardTextFormat` (joiner, max_length) makes the token ids of the preference data, the
normalisation and `LearnedReward`, and it is stored with the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.preferences import RewardTextFormat
from rlhf_lightning.models import ScalarRewardModel, load_tokenizer
from rlhf_lightning.models.reward_model import METADATA_FILE, UnscorableRewardModelError
from rlhf_lightning.models.tiny import build_char_tokenizer
from rlhf_lightning.rewards import LearnedReward
from tests.data.test_tokenize import char_ids, write_jsonl

ROWS = [
    {"prompt": "The film was", "chosen": "good and fun.", "rejected": "slow."},
    # 12 + 1 + 41 characters: longer than max_length, so the cut matters
    {
        "prompt": "Long prompt",
        "chosen": "a response that is longer than the limit.",
        "rejected": "no",
    },
]


def test_text_joins_with_the_joiner_and_drops_the_responses_leading_space():
    fmt = RewardTextFormat(joiner=" ", max_length=8)
    # A sampled continuation carries its leading space; a stored response is stripped.
    assert fmt.text("The film was", " great") == "The film was great"
    assert fmt.text("The film was", "great") == "The film was great"
    assert fmt.text("Q:", "\n A") == "Q: A"
    assert RewardTextFormat(joiner="").text("The film was", " great") == "The film was great"
    assert RewardTextFormat(joiner="").text("a", "b") == "ab"
    tokenizer = build_char_tokenizer()
    ids = fmt.token_ids(tokenizer, ["The film was"], ["great"])
    assert ids == [char_ids(tokenizer, "The film was great")[-8:]]
    with pytest.raises(ValueError, match="max_length"):
        RewardTextFormat(max_length=0)


def _export(tmp_path: Path, tiny_model_dir: Path, tokenizer, text_format) -> Path:
    torch.manual_seed(0)
    model = ScalarRewardModel.from_backbone(tiny_model_dir, text_format=text_format)
    return model.save_pretrained(tmp_path / "rm", tokenizer)


def _model_inputs(reward: LearnedReward) -> list[tuple[list[int], list[int]]]:
    """Records (input_ids, attention_mask) rows of every forward of the reward's backbone."""
    seen = []

    def record(_module, _args, kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            seen.append((ids[mask.bool()].tolist(), mask.tolist()))

    reward.model.backbone.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def test_scoring_reads_the_token_ids_training_read(tmp_path, tiny_model_dir, bos_tokenizer):
    """With a tokenizer that adds special tokens and texts longer than max_length, the ids the
    reward model sees for (prompt, response) at scoring equal the training batch's ids, whether
    the response comes stripped (as stored) or with the leading space of a sampled one."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    data = PreferenceDataModule(
        path, bos_tokenizer, max_length=16, batch_size=2, eval_batch_size=2, seed=0,
        joiner=" ", eval_path=path,
    )  # fmt: skip
    data.setup()
    assert data.text_format == RewardTextFormat(joiner=" ", max_length=16)
    trained = {item["prompt"]: item for item in data.train_items}
    long = trained["Long prompt"]["chosen_ids"]
    assert len(long) == 16 and long[0] != 1  # cut: the BOS is gone, the end is kept
    assert long[-1] == 2 and long[:-1] == char_ids(bos_tokenizer, "longer than the limit.")[-15:]

    out = _export(tmp_path, tiny_model_dir, bos_tokenizer, data.text_format)
    stored = json.loads((out / METADATA_FILE).read_text())["text_format"]
    assert stored == {"joiner": " ", "max_length": 16}
    reward = LearnedReward(out, batch_size=4, normalize=False)
    seen = _model_inputs(reward)
    prompts = [row["prompt"] for row in ROWS]
    for responses in ([row["chosen"] for row in ROWS], [" " + row["chosen"] for row in ROWS]):
        seen.clear()
        reward(prompts, responses)
        assert [ids for ids, _ in seen] == [trained[p]["chosen_ids"] for p in prompts]
    # The training collator builds the same rows (right-padded) for the same pair.
    batch = next(iter(data.train_dataloader()))
    rows = [
        ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]
    assert sorted(rows) == sorted(
        [item[k] for item in data.train_items for k in ("chosen_ids", "rejected_ids")]
    )


def test_a_model_exported_with_max_length_96_scores_at_96(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    out = _export(tmp_path, tiny_model_dir, tokenizer, RewardTextFormat(" ", 96))
    reward = LearnedReward(out, normalize=False)
    seen = _model_inputs(reward)
    prompt, response = "p" * 150, " the end of a long response"
    score = reward([prompt, "short"], [response, "one"])
    (long_ids, long_mask), (short_ids, _) = seen
    assert len(long_ids) == len(long_mask) == 96
    assert long_ids == char_ids(tokenizer, prompt + response)[-96:]
    assert short_ids == char_ids(tokenizer, "short one")
    # The score is that of exactly those 96 ids.
    model = ScalarRewardModel.from_pretrained(out)
    ids = torch.tensor([long_ids])
    torch.testing.assert_close(score[:1], model(ids, torch.ones_like(ids)))


def test_format_1_loads_as_a_critic_but_is_not_scored(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    out = _export(tmp_path, tiny_model_dir, tokenizer, RewardTextFormat())
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["format_version"] == 2
    del metadata["text_format"]
    metadata["format_version"] = 1
    (out / METADATA_FILE).write_text(json.dumps(metadata))
    assert ScalarRewardModel.from_pretrained(out).text_format is None
    with pytest.raises(UnscorableRewardModelError, match=rf"{out}: .*no text_format.*joiner"):
        LearnedReward(out)
    metadata.update(format_version=2, text_format={"joiner": " "})  # max_length missing
    (out / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"reward_model.json: text_format must be"):
        ScalarRewardModel.from_pretrained(out)
