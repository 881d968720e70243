"""Data loading, validation and batching (tiny character tokenizer); the samplers and padding:
test_sampler.py."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate
from lightning import LightningModule, Trainer
from omegaconf import OmegaConf

from rlhf_lightning.data import (
    DataValidationError,
    PreferenceDataModule,
    PromptDataModule,
    resolve_data_path,
    stream_indices,
)
from rlhf_lightning.data.loading import EXPERIMENTS_DIR
from rlhf_lightning.errors import FieldError, UserError

REPO = Path(__file__).resolve().parents[2]
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tokenizer():
    """One token per printable ASCII character: id = ord(c) - 30; pad 0, eos 1, unk 97."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_end|>"]
    characters = [chr(code) for code in range(32, 127)]
    vocab = {token: i for i, token in enumerate([*specials, *characters, "<unk>"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
    )


def ids(text: str) -> list[int]:
    """Token ids of `text` under the fixture tokenizer, computed by hand."""
    return [ord(c) - 30 for c in text]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def prompts_module(tokenizer, path: str, **overrides) -> PromptDataModule:
    args = dict(max_prompt_length=64, batch_size=2, eval_batch_size=2, seed=0, eval_fraction=0.25)
    return PromptDataModule(path=path, tokenizer=tokenizer, **{**args, **overrides})


def pairs_module(tokenizer, path: str, **overrides) -> PreferenceDataModule:
    args = dict(max_length=64, batch_size=2, eval_batch_size=2, seed=0, eval_fraction=0.25)
    return PreferenceDataModule(path=path, tokenizer=tokenizer, **{**args, **overrides})


def pair(i: int, **fields) -> dict:
    return {"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", **fields}


GOOD_PAIRS = [pair(i) for i in range(8)]


# ---------------------------------------------------------------- paths and loading


def test_resolve_data_path_shipped_and_plain():
    shipped = resolve_data_path("shipped:sentiment/data/tiny_prompts.jsonl")
    assert Path(shipped) == REPO / "experiments/sentiment/data/tiny_prompts.jsonl"
    assert Path(shipped).is_file()
    assert EXPERIMENTS_DIR == REPO / "experiments"
    for plain in ("data/x.jsonl", "/abs/x.csv", "stanfordnlp/imdb"):
        assert resolve_data_path(plain) == plain


def test_missing_file(tokenizer, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataValidationError, match=rf"{missing}: file not found"):
        prompts_module(tokenizer, missing).setup()


def test_hub_name_offline_fails_fast_with_clear_message(tokenizer):
    import datasets  # noqa: F401  (imported first: its import time is not the point)

    start = time.monotonic()
    expected = "no-such-user/no-such-set: not reachable and not in the local cache"
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, "no-such-user/no-such-set").setup()
    assert time.monotonic() - start < 5.0


def test_truncated_json_line_names_row_and_line(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"p\.jsonl, row 3 \(line 4\): invalid JSON"):
        prompts_module(tokenizer, str(path)).setup()


def test_jsonl_line_that_is_not_an_object(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, ["prompt", "b"]])
    with pytest.raises(DataValidationError, match=r"row 2 \(line 2\): expected a JSON object"):
        prompts_module(tokenizer, path).setup()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "p.jsonl",
            b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xff"}\n',
            r"line 3: invalid UTF-8",
        ),
        ("p.json", b'[\n{"prompt": "a"},\n{"prompt": ', r"row 2 \(line 3\): invalid JSON"),
        # The quoted field spans two lines, so row 2 starts on line 3 and row 3 on line 5.
        (
            "p.csv",
            b'prompt,label\na,1\n"b\nb",2\nc,3,extra\n',
            r"row 3 \(line 5\): expected 2 fields",
        ),
    ],
)
def test_malformed_file_names_its_row_and_line(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataValidationError, match=re.escape(name) + ", " + message):
        prompts_module(tokenizer, str(path)).setup()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.json", json.dumps([{"prompt": f"q{i}"} for i in range(4)]), ["q0", "q1", "q2", "q3"]),
        ("p.csv", 'prompt,label\na,1\n"b\nb",2\n\nc,3\nd,4\n', ["a", "b\nb", "c", "d"]),
    ],
)
def test_json_arrays_and_csv_rows_with_multiline_fields_are_read(
    tokenizer, tmp_path, name, content, expected
):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    module = prompts_module(tokenizer, str(path))
    module.setup()
    assert sorted(item["prompt"] for item in module.train_items + module.eval_items) == expected


def test_missing_column_lists_found_columns(tokenizer, tmp_path):
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"text": "b", "label": 1}])
    expected = r"p\.jsonl, row 2 \(line 2\): missing column 'prompt' \(found columns: 'text', 'lab"
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, jsonl).setup()
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,chosen,answer\nx,y,z\n", encoding="utf-8")
    expected = r"pairs\.csv, row 1 \(line 2\): missing column 'rejected' \(found columns: 'prompt'"
    with pytest.raises(DataValidationError, match=expected):
        pairs_module(tokenizer, str(csv_path)).setup()


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [
        ("", "is empty or whitespace only"),
        ("  \n\t", "is empty or whitespace only"),
        (None, "must be a string, got NoneType None"),
        (7, "must be a string, got int 7"),
        (["a"], "must be a string, got list"),
    ],
)
def test_bad_text_values(tokenizer, tmp_path, bad_value, message):
    rows = [pair(0), pair(1), pair(2, chosen=bad_value), pair(3)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataValidationError, match=rf"row 3 \(line 3\): column 'chosen' {message}"):
        pairs_module(tokenizer, path).setup()


def test_parquet_wrong_type_names_row(tokenizer, tmp_path):
    path = str(tmp_path / "pairs.parquet")
    table = pa.table({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": [1, 2]})
    pq.write_table(table, path)
    expected = r"pairs\.parquet, row 1: column 'rejected' must be a string, got int 1"
    with pytest.raises(DataValidationError, match=expected):
        pairs_module(tokenizer, path).setup()


def test_parquet_is_read(tokenizer, tmp_path):
    path = str(tmp_path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(GOOD_PAIRS), path)
    module = pairs_module(tokenizer, path)
    module.setup()
    assert sorted(item["prompt"] for item in module.train_items + module.eval_items) == sorted(
        row["prompt"] for row in GOOD_PAIRS
    )


def test_unreadable_parquet(tokenizer, tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataValidationError, match=r"pairs\.parquet: cannot read parquet file"):
        pairs_module(tokenizer, str(path)).setup()


def test_chosen_equal_to_rejected(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(0), pair(1, rejected="good 1")])
    with pytest.raises(DataValidationError, match=r"row 2 \(line 2\): chosen and rejected are"):
        pairs_module(tokenizer, path).setup()


def test_duplicate_row_names_first_occurrence(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(0), pair(1), pair(2), pair(1)])
    with pytest.raises(DataValidationError, match=r"row 4 \(line 4\): exact duplicate of row 2"):
        pairs_module(tokenizer, path).setup()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "a"}])
    with pytest.raises(DataValidationError, match=r"row 2 \(line 2\): exact duplicate of row 1"):
        prompts_module(tokenizer, prompts).setup()


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), "abc", True, None])
def test_margin_must_be_finite_number(tokenizer, tmp_path, margin):
    path = tmp_path / "pairs.jsonl"
    # json.dumps writes NaN/Infinity, which Python's json reads back as floats.
    write_jsonl(path, [pair(0, margin=1.0), pair(1, margin=margin)])
    with pytest.raises(DataValidationError, match=r"row 2 \(line 2\): column 'margin' must be a"):
        pairs_module(tokenizer, str(path), margin_column="margin").setup()


def test_csv_margin_strings_are_parsed(tokenizer, tmp_path):
    path = tmp_path / "pairs.csv"
    lines = ["prompt,chosen,rejected,margin"] + [f"p{i},good,bad {i},{i}.5" for i in range(4)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    module = pairs_module(tokenizer, str(path), margin_column="m", eval_fraction=0.25)
    with pytest.raises(DataValidationError, match="missing column 'm'"):
        module.setup()
    module = pairs_module(tokenizer, str(path), margin_column="margin", eval_fraction=0.25)
    module.setup()
    margins = {item["prompt"]: item["margin"] for item in module.train_items + module.eval_items}
    assert margins == {"p0": 0.5, "p1": 1.5, "p2": 2.5, "p3": 3.5}


def test_skip_mode_counts_logs_and_keeps_good_rows(tokenizer, tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    good = [json.dumps(row) for row in GOOD_PAIRS]
    bad = [
        '{"prompt": "x", "chosen": "y"',  # truncated: malformed
        json.dumps(pair(20, chosen="")),  # empty_text
        json.dumps(pair(21, rejected=3)),  # not_a_string
        json.dumps(pair(22, rejected="good 22")),  # chosen_equals_rejected
        json.dumps({"question": "q"}),  # missing_column
        json.dumps(GOOD_PAIRS[0]),  # duplicate
        json.dumps(pair(23, chosen=" ")),  # empty_text
    ]
    path.write_text("\n".join(good + bad) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data"):
        module = pairs_module(tokenizer, str(path), on_bad_row="skip")
        module.setup()
    assert module.skipped == {
        "malformed": 1,
        "empty_text": 2,
        "not_a_string": 1,
        "chosen_equals_rejected": 1,
        "missing_column": 1,
        "duplicate": 1,
    }
    assert len(module.train_items) + len(module.eval_items) == len(GOOD_PAIRS)
    log_text = caplog.text
    assert "dropped 7 rows" in log_text
    assert "empty_text: 2" in log_text
    assert "pairs.jsonl, row 10 (line 10)" in log_text  # the first empty_text row
    assert "pairs.jsonl, row 14 (line 14): exact duplicate of row 1" in log_text


def test_skip_mode_with_nothing_left_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b"}])
    expected = r"(?s)p\.jsonl: no usable rows; dropped rows:\nmissing_column: 2\n  e\.g\. .*row 1"
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, path, on_bad_row="skip").setup()
    with pytest.raises(DataValidationError, match=r"(?s)p\.jsonl: no usable rows.*missing_col"):
        pairs_module(tokenizer, path, on_bad_row="skip").setup()


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("on_bad_row", "ignore", "must be one of error, skip"),
        ("too_long", "truncate_right", "must be one of truncate_left, drop, error"),
        ("template", "Review: {text}", "only field"),
        ("template", "Review: {prompt", "not a valid format string"),
        ("prefix_tokens", [5, 2], "1 <= min <= max"),
        ("eval_fraction", 1.0, r"must be in \(0, 1\), got 1.0"),
        ("eval_fraction", 0.0, r"must be in \(0, 1\), got 0.0"),
        ("max_prompt_length", 0, "must be >= 1, got 0"),
        ("num_workers", -1, "must be >= 0, got -1"),
    ],
)
def test_bad_arguments_fail_at_construction(tokenizer, tmp_path, setting, value, reason):
    """A user error naming the argument (the config builder names its full key)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(FieldError, match=f"^{setting}: .*{reason}") as error:
        prompts_module(tokenizer, path, **{setting: value})
    assert error.value.field == setting and isinstance(error.value, UserError)


def test_every_rank_needs_an_eval_prompt(tokenizer, tmp_path):
    """Checked the same on every rank, before training (no rank goes on alone)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    module = prompts_module(tokenizer, path, eval_fraction=0.125)
    module.setup()
    assert len(module.eval_items) == 1
    module.check_eval_shards(1)
    with pytest.raises(DataValidationError, match="^prompts: 1 eval prompts for 2 ranks; each"):
        module.check_eval_shards(2)


def test_bad_pair_arguments_fail_at_construction(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(FieldError, match="^max_length: must be >= 1, got 0$"):
        pairs_module(tokenizer, path, max_length=0)
    with pytest.raises(FieldError, match="^max_train_rows: must be >= 1"):
        pairs_module(tokenizer, path, max_train_rows=0)


def test_tokenizer_without_pad_token_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
    with pytest.raises(ValueError, match="no pad token"):
        prompts_module(bare, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]))


# ---------------------------------------------------------------- prompts


def test_prompt_too_long_policies(tokenizer, tmp_path):
    rows = [{"prompt": "short"}, {"prompt": "0123456789"}, {"prompt": "tiny"}, {"prompt": "ok"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "e"}])

    module = prompts_module(tokenizer, path, max_prompt_length=6, eval_path=evaluation)
    module.setup()
    truncated = {item["prompt"]: item["input_ids"] for item in module.train_items}
    assert truncated["456789"] == ids("456789")  # the last 6 tokens survive
    assert truncated["short"] == ids("short")
    assert module.skipped == {}

    module = prompts_module(
        tokenizer, path, max_prompt_length=6, eval_path=evaluation, too_long="drop"
    )
    module.setup()
    assert [item["prompt"] for item in module.train_items] == ["short", "tiny", "ok"]
    assert module.skipped == {"prompt_too_long": 1}

    module = prompts_module(
        tokenizer, path, max_prompt_length=6, eval_path=evaluation, too_long="error"
    )
    with pytest.raises(DataValidationError, match=r"row 2 \(line 2\): prompt has 10 tokens"):
        module.setup()
    # too_long="error" raises even when other bad rows are skipped.
    module = prompts_module(
        tokenizer, path, max_prompt_length=6, too_long="error", on_bad_row="skip"
    )
    with pytest.raises(DataValidationError, match="more than max_prompt_length=6"):
        module.setup()


def test_prompt_batches_are_left_padded(tokenizer, tmp_path):
    texts = ["a", "bcd", "ef"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"prompt": t} for t in texts])
    module = prompts_module(tokenizer, path, eval_path=evaluation, eval_batch_size=3)
    module.setup()
    assert tokenizer.padding_side == "left"
    batch = next(iter(module.val_dataloader()))
    assert batch["prompts"] == texts
    expected_ids = [
        [PAD, PAD, *ids("a")],
        ids("bcd"),
        [PAD, *ids("ef")],
    ]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert batch["input_ids"].dtype == torch.long
    # The tokenizer's own left padding agrees.
    assert tokenizer(texts, padding=True)["input_ids"] == expected_ids


def test_template_is_applied_before_tokenizing(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in ["abc", "de", "f", "g"]])
    module = prompts_module(tokenizer, path, text_column="text", template="R: {prompt} ->")
    module.setup()
    items = module.train_items + module.eval_items
    assert sorted(item["prompt"] for item in items) == [
        "R: abc ->",
        "R: de ->",
        "R: f ->",
        "R: g ->",
    ]
    assert all(item["input_ids"] == ids(item["prompt"]) for item in items)


def test_prefix_tokens_are_seeded_per_row(tokenizer, tmp_path):
    texts = [f"{i:02d} " + "abcdefghijklmnopqrstuvwxyz" for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])

    def prefixes(seed: int) -> dict[str, str]:
        options = dict(text_column="text", prefix_tokens=[4, 9], template="<{prompt}")
        module = prompts_module(tokenizer, path, seed=seed, **options)
        module.setup()
        found = {}
        for item in module.train_items + module.eval_items:
            prefix = item["prompt"].removeprefix("<")
            found[prefix[:2]] = prefix
        return found

    first = prefixes(seed=0)
    assert len(first) == len(texts)
    for text in texts:
        prefix = first[text[:2]]
        assert text.startswith(prefix)
        assert 4 <= len(prefix) <= 9
    assert {len(prefix) for prefix in first.values()} == set(range(4, 10))
    assert prefixes(seed=0) == first
    assert prefixes(seed=1) != first


def test_eval_fraction_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(20)])

    def split(seed: int) -> tuple[list[str], list[str]]:
        module = prompts_module(tokenizer, path, seed=seed, eval_fraction=0.25)
        module.setup()
        return (
            [item["prompt"] for item in module.train_items],
            [item["prompt"] for item in module.eval_items],
        )

    train, evaluation = split(0)
    assert len(evaluation) == 5 and len(train) == 15
    assert sorted(train + evaluation) == sorted(f"q{i}" for i in range(20))
    assert split(0) == (train, evaluation)
    assert split(1)[1] != evaluation


def test_train_dataloader_gives_one_rollout_batch_per_epoch(tokenizer, tmp_path):
    texts = [f"q{i:02d}" for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "e"}])
    module = prompts_module(tokenizer, path, eval_path=evaluation, batch_size=3, seed=5)
    module.setup()
    loader = module.train_dataloader()
    seen = []
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
        batches = list(loader)
        assert len(batches) == 1
        assert batches[0]["input_ids"].shape == (3, 3)
        seen += batches[0]["prompts"]
    assert sorted(seen) == texts  # 4 epochs x 3 prompts = one full pass
    expected = [texts[i] for i in stream_indices(12, seed=5, start=0, count=12)]
    assert seen == expected


def test_val_dataloader_shards_by_rank(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "t"}])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"e{i}"} for i in range(5)])
    module = prompts_module(tokenizer, path, eval_path=evaluation, eval_batch_size=8)
    module.setup()
    shards = []
    for rank in range(2):
        # Only the attributes the datamodule reads from a Lightning Trainer.
        module.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shards.append([p for batch in module.val_dataloader() for p in batch["prompts"]])
    assert shards == [["e0", "e2", "e4"], ["e1", "e3"]]


def test_ddp_trainer_must_leave_the_sampler_alone(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(8)])
    module = prompts_module(tokenizer, path)
    module.setup()
    options = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    module.trainer = Trainer(**options)  # built, never launched: rank 0 of 2
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        module.train_dataloader()
    module.trainer = Trainer(**options, use_distributed_sampler=False)
    sampler = module.train_dataloader().sampler
    assert (sampler.rank, sampler.world_size) == (0, 2)


# ---------------------------------------------------------------- preferences


def test_preference_batch_layout_and_right_padding(tokenizer, tmp_path):
    rows = [
        {"prompt": "ab", "chosen": "yes", "rejected": "n", "margin": 0.5},
        {"prompt": "c", "chosen": "ok", "rejected": "nope!", "margin": 2},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    module = pairs_module(
        tokenizer, path, eval_path=path, margin_column="margin", joiner=" ", eval_batch_size=2
    )
    module.setup()
    batch = next(iter(module.val_dataloader()))
    texts = ["ab yes", "c ok", "ab n", "c nope!"]  # chosen rows first, then rejected
    expected = [ids(t) + [PAD] * (7 - len(t)) for t in texts]
    assert batch["input_ids"].tolist() == expected
    assert batch["attention_mask"].tolist() == [[1] * len(t) + [0] * (7 - len(t)) for t in texts]
    assert tokenizer(texts, padding=True, padding_side="right")["input_ids"] == expected
    assert batch["margin"].dtype == torch.float32
    assert batch["margin"].tolist() == [0.5, 2.0]


def test_preference_texts_are_truncated_from_the_left(tokenizer, tmp_path):
    rows = [pair(0, prompt="a long prompt", chosen="end!", rejected="fin")] + GOOD_PAIRS
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    module = pairs_module(tokenizer, path, eval_path=path, max_length=6, eval_batch_size=9)
    module.setup()
    batch = next(iter(module.val_dataloader()))
    assert "margin" not in batch
    assert batch["input_ids"].shape == (18, 6)
    assert batch["input_ids"][0].tolist() == ids("ptend!")  # "a long prompt" + "end!"
    assert batch["input_ids"][9].tolist() == ids("mptfin")
    assert batch["attention_mask"][9].tolist() == [1] * 6


def test_pairs_equal_after_truncation_are_refused_or_dropped_in_setup(tokenizer, tmp_path, caplog):
    # Left truncation keeps the ends: pairs that differ only at the start become identical.
    rows = [pair(i) for i in range(6)] + [
        pair(6, chosen="Great. And so it ends.", rejected="Awful. And so it ends."),
        pair(7, chosen="caf\u00e9", rejected="caf\u00e8"),  # both "caf<unk>" for this tokenizer
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    expected = (
        r"pairs\.jsonl, row 7 \(line 7\): chosen and rejected are the same tokens once cut to "
        r"their last max_length=12 tokens \(they are 24 and 24 tokens and differ only in what is "
        r"cut\); raise max_length or shorten the prompt"
    )
    with pytest.raises(DataValidationError, match=expected):
        pairs_module(tokenizer, path, max_length=12).setup()
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data"):
        module = pairs_module(tokenizer, path, max_length=12, on_bad_row="skip")
        module.setup()
    assert module.skipped == {"same_tokens": 2}
    kept = module.train_items + module.eval_items
    assert sorted(item["prompt"] for item in kept) == [f"p{i}" for i in range(6)]
    assert "pairs.jsonl, row 8 (line 8): chosen and rejected tokenise to the same tokens" in (
        caplog.text
    )
    module = pairs_module(tokenizer, path, max_length=64, on_bad_row="skip")  # room for all
    module.setup()
    assert module.skipped == {"same_tokens": 1}


def test_preference_train_loader_is_seeded_and_train_texts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", GOOD_PAIRS)
    module = pairs_module(tokenizer, path, batch_size=3, eval_fraction=0.25)
    module.setup()
    assert len(module.train_items) == 6
    first = [batch["input_ids"].tolist() for batch in module.train_dataloader()]
    again = [batch["input_ids"].tolist() for batch in module.train_dataloader()]
    assert first == again
    assert [batch_ids.__len__() for batch_ids in first] == [6, 6]  # 2 x 3 pairs
    texts = module.train_texts()
    prompts = [item["prompt"] for item in module.train_items]
    assert texts[:6] == [(p, f"good {p[1:]}") for p in prompts]
    assert texts[6:] == [(p, f"bad {p[1:]}") for p in prompts]


# ---------------------------------------------------------------- shipped configs and data


def load_data_config(group: str, name: str):
    """conf/data/<group>/<name>.yaml under a root that provides `seed`, as Hydra composes it."""
    root = OmegaConf.create({"seed": 42, "data": {group: {}}})
    root.data[group] = OmegaConf.load(REPO / "conf" / "data" / group / f"{name}.yaml")
    return root.data[group]


def test_tiny_configs_load_the_shipped_fixtures(tokenizer):
    prompts = instantiate(load_data_config("prompts", "tiny"), tokenizer=tokenizer)
    assert isinstance(prompts, PromptDataModule)
    prompts.setup()
    assert len(prompts.train_items) + len(prompts.eval_items) == 64
    assert prompts.skipped == {}
    pairs = instantiate(load_data_config("preferences", "tiny"), tokenizer=tokenizer)
    assert isinstance(pairs, PreferenceDataModule)
    pairs.setup()
    assert len(pairs.train_items) + len(pairs.eval_items) == 128
    positive = {"good", "great", "fun", "nice", "superb", "lovely"}
    for item in pairs.train_items + pairs.eval_items:
        assert set(item["chosen"].rstrip(".").split()) <= positive
        assert not set(item["rejected"].rstrip(".").split()) & positive


def test_imdb_config_fails_fast_offline(tokenizer):
    module = instantiate(load_data_config("prompts", "imdb"), tokenizer=tokenizer)
    assert module.prefix_tokens == (2, 8)
    with pytest.raises(DataValidationError, match="imdb: not reachable and not in the local cache"):
        module.setup()


def test_sentiment_configs_load_the_shipped_data(tokenizer):
    # The config's max_prompt_length is in SmolLM2 tokens; the test tokenizer counts characters.
    config = load_data_config("prompts", "sentiment")
    prompts = instantiate(config, tokenizer=tokenizer, max_prompt_length=128)
    prompts.setup()
    assert len(prompts.train_items) >= 1000 and len(prompts.eval_items) >= 200
    train = {item["prompt"] for item in prompts.train_items}
    assert not train & {item["prompt"] for item in prompts.eval_items}
    pairs = instantiate(load_data_config("preferences", "sentiment"), tokenizer=tokenizer)
    pairs.setup()
    assert len(pairs.train_items) >= 3000 and len(pairs.eval_items) >= 500
    assert pairs.skipped == {}
    eval_prompts = {item["prompt"] for item in prompts.eval_items}
    assert {item["prompt"] for item in pairs.eval_items} <= eval_prompts
    assert not {item["prompt"] for item in pairs.train_items} & eval_prompts
    for split in ("train", "eval"):
        path = REPO / f"experiments/sentiment/data/preferences_{split}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert row["chosen_score"] - row["rejected_score"] >= 0.1


class RecordPrompts(LightningModule):
    """Records the prompts of every training batch; no parameters to train."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def training_step(self, batch: dict, batch_index: int) -> None:
        self.seen.append(batch["prompts"])

    def configure_optimizers(self) -> None:
        return None


def fit_recording_prompts(module: PromptDataModule, max_epochs: int, ckpt_path=None):
    recorder = RecordPrompts()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(recorder, datamodule=module, ckpt_path=ckpt_path)
    return trainer, recorder.seen


@pytest.mark.filterwarnings("ignore::UserWarning")  # no optimizer, training_step returns None
def test_lightning_fit_and_resume_take_one_rollout_batch_per_epoch(tokenizer, tmp_path):
    texts = [f"q{i:02d}" for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    module = prompts_module(tokenizer, path, eval_fraction=0.2, batch_size=3, seed=7)
    _, seen = fit_recording_prompts(module, max_epochs=4)
    train_prompts = [item["prompt"] for item in module.train_items]
    stream = stream_indices(len(train_prompts), seed=7, start=0, count=12)
    assert seen == [[train_prompts[i] for i in stream[3 * e : 3 * e + 3]] for e in range(4)]

    trainer, first_half = fit_recording_prompts(module, max_epochs=2)
    checkpoint = str(tmp_path / "half.ckpt")
    trainer.save_checkpoint(checkpoint)
    fresh = prompts_module(tokenizer, path, eval_fraction=0.2, batch_size=3, seed=7)
    _, second_half = fit_recording_prompts(fresh, max_epochs=4, ckpt_path=checkpoint)
    assert first_half + second_half == seen


def test_chat_template_wraps_the_prompt_tokens_but_not_the_prompt_text(tmp_path):
    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.models import apply_chat_template, load_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi there"}\n{"prompt": "second"}\n')
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    dm = PromptDataModule(
        str(path), tok, max_prompt_length=64, batch_size=1, eval_batch_size=1, seed=0,
        eval_path=str(path), chat_template=True,
    )  # fmt: skip
    dm.setup("fit")
    item = next(i for i in dm.train_items if i["prompt"] == "hi there")
    expected = apply_chat_template(tok, ["hi there"])[0]
    assert tok.decode(item["input_ids"]) == expected
    assert expected.startswith("<|im_start|>user\nhi there") and item["prompt"] == "hi there"


def test_one_huge_row_names_its_row_or_is_counted(tmp_path):
    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.data.validation import DataValidationError
    from rlhf_lightning.models import load_tokenizer

    path = tmp_path / "p.jsonl"
    rows = ['{"prompt": "short one"}', json.dumps({"prompt": "x" * 200_000}), '{"prompt": "ok"}']
    path.write_text("\n".join(rows) + "\n")
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    kwargs = dict(max_prompt_length=32, batch_size=1, eval_batch_size=1, seed=0,
                  eval_path=str(path))  # fmt: skip
    with pytest.raises(DataValidationError, match=r"p\.jsonl, row 2"):
        PromptDataModule(str(path), tok, too_long="error", **kwargs).setup("fit")
    dm = PromptDataModule(str(path), tok, too_long="drop", on_bad_row="skip", **kwargs)
    dm.setup("fit")
    assert sum(dm.skipped.values()) >= 1 and len(dm.train_items) == 2


def test_max_train_rows_keeps_a_seeded_subset_in_data_order(tokenizer):
    config = load_data_config("preferences", "sentiment")
    full = instantiate(config, tokenizer=tokenizer)
    full.setup()
    few = instantiate(config, tokenizer=tokenizer, max_train_rows=100)
    few.setup()
    again = instantiate(config, tokenizer=tokenizer, max_train_rows=100)
    again.setup()
    other_seed = instantiate(config, tokenizer=tokenizer, max_train_rows=100, seed=7)
    other_seed.setup()
    key = [(item["prompt"], item["chosen"]) for item in few.train_items]
    assert len(key) == 100 and key == [(i["prompt"], i["chosen"]) for i in again.train_items]
    assert key != [(i["prompt"], i["chosen"]) for i in other_seed.train_items]
    position = {(i["prompt"], i["chosen"]): n for n, i in enumerate(full.train_items)}
    assert [position[k] for k in key] == sorted(position[k] for k in key)  # data order kept
    assert len(few.eval_items) == len(full.eval_items)  # the eval set is untouched
    with pytest.raises(Exception, match="max_train_rows: must be >= 1"):
        instantiate(config, tokenizer=tokenizer, max_train_rows=0)
