"""Data files that Python's readers choke on: each gives one message naming the file and row."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from rlhf_lightning.data import DataValidationError, PreferenceDataModule, PromptDataModule

DEEP = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit
LONG_INT = "1" * (sys.get_int_max_str_digits() + 1)  # int() refuses this many digits


def prompts_module(tokenizer, path, **overrides) -> PromptDataModule:
    args = dict(max_prompt_length=64, batch_size=2, eval_batch_size=2, seed=0, eval_fraction=0.25)
    return PromptDataModule(path=str(path), tokenizer=tokenizer, **{**args, **overrides})


def pairs_module(tokenizer, path, **overrides) -> PreferenceDataModule:
    args = dict(max_length=64, batch_size=2, eval_batch_size=2, seed=0, eval_fraction=0.25)
    return PreferenceDataModule(path=str(path), tokenizer=tokenizer, **{**args, **overrides})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = [json.dumps({"prompt": f"prompt {i}"}) for i in range(4)]

# A JSON object line that Python cannot read, or reads ambiguously, and the message it gets.
BAD_JSON_ROWS = {
    "deep_nesting": (
        '{"prompt": "a", "meta": ' + DEEP + "}",
        "malformed",
        r"invalid JSON: nested too deeply",
    ),
    "long_integer": (
        '{"prompt": "a", "id": ' + LONG_INT + "}",
        "malformed",
        rf"invalid JSON: an integer with more than {sys.get_int_max_str_digits()} digits",
    ),
    "lone_surrogate": (
        '{"prompt": "caf\\ud800e"}',
        "invalid_unicode",
        r"column 'prompt' holds a lone UTF-16 surrogate \\ud800 \(character 4\)",
    ),
    "surrogate_in_nested_value": (
        '{"prompt": "a", "meta": {"note": ["x", "\\udfff"]}}',
        "invalid_unicode",
        r"column 'meta' holds a lone UTF-16 surrogate \\udfff",
    ),
    "duplicate_key": (
        '{"prompt": "a", "prompt": "b"}',
        "duplicate_key",
        r"key 'prompt' appears twice in one JSON object",
    ),
    "nested_duplicate_key": (
        '{"prompt": "a", "meta": {"x": 1, "x": 2}}',
        "duplicate_key",
        r"key 'x' appears twice in one JSON object",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_ROWS))
def test_bad_jsonl_row_names_file_and_row(tokenizer, tmp_path, case):
    line, _, message = BAD_JSON_ROWS[case]
    path = write_lines(tmp_path / "p.jsonl", [GOOD[0], GOOD[1], line, GOOD[2]])
    with pytest.raises(DataValidationError, match=rf"p\.jsonl, row 3 \(line 3\): {message}"):
        prompts_module(tokenizer, path).setup()


@pytest.mark.parametrize("case", sorted(BAD_JSON_ROWS))
def test_bad_jsonl_row_is_skipped_and_counted(tokenizer, tmp_path, case, caplog):
    line, reason, _ = BAD_JSON_ROWS[case]
    path = write_lines(tmp_path / "p.jsonl", [GOOD[0], line, GOOD[1], GOOD[2], GOOD[3]])
    module = prompts_module(tokenizer, path, on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data"):
        module.setup()
    assert module.skipped == {reason: 1}
    assert len(module.train_items) + len(module.eval_items) == 4
    assert "p.jsonl, row 2 (line 2)" in caplog.text


@pytest.mark.parametrize("case", ["lone_surrogate", "duplicate_key", "nested_duplicate_key"])
def test_bad_json_array_element_names_file_row_and_line(tokenizer, tmp_path, case):
    line, reason, message = BAD_JSON_ROWS[case]
    path = tmp_path / "p.json"
    path.write_text("[\n" + ",\n".join([GOOD[0], GOOD[1], line, GOOD[2]]) + "\n]\n")
    with pytest.raises(DataValidationError, match=rf"p\.json, row 3 \(line 4\): {message}"):
        prompts_module(tokenizer, path).setup()
    module = prompts_module(tokenizer, path, on_bad_row="skip")  # the other rows are usable
    module.setup()
    assert module.skipped == {reason: 1}
    assert len(module.train_items) + len(module.eval_items) == 3


@pytest.mark.parametrize("case", ["deep_nesting", "long_integer"])
def test_unreadable_json_array_element_stops_with_its_row(tokenizer, tmp_path, case):
    # The parser cannot tell where such an element ends: the file is unusable even under skip.
    line, _, message = BAD_JSON_ROWS[case]
    path = tmp_path / "p.json"
    path.write_text("[\n" + ",\n".join([GOOD[0], line, GOOD[1]]) + "\n]\n")
    for on_bad_row in ("error", "skip"):
        with pytest.raises(DataValidationError, match=rf"p\.json, row 2 \(line 3\): {message}"):
            prompts_module(tokenizer, path, on_bad_row=on_bad_row).setup()


def test_json_array_rows_carry_their_lines(tokenizer, tmp_path):
    path = tmp_path / "p.json"
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": 3}]
    path.write_text(json.dumps(rows, indent=1))  # each object spans 3 lines after the "["
    with pytest.raises(DataValidationError, match=r"p\.json, row 3 \(line 8\): column 'prompt'"):
        prompts_module(tokenizer, path).setup()
    path.write_text('[{"prompt": "a"}, ["b"], {"prompt": "c"}, {"prompt": "d"}]')
    with pytest.raises(DataValidationError, match=r"row 2 \(line 1\): expected a JSON object"):
        prompts_module(tokenizer, path).setup()
    module = prompts_module(tokenizer, path, on_bad_row="skip")
    module.setup()
    assert module.skipped == {"malformed": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[\n{"prompt": "a"},\n{"prompt": ', r"p\.json, row 2 \(line 3\): invalid JSON: Expecting"),
        ('[{"prompt": "a"} {"prompt": "b"}]', r"p\.json, line 1: invalid JSON: expected ','"),
        ('[{"prompt": "a"}] x', r"p\.json, line 1: invalid JSON: extra data after the array"),
        ('{"prompt": "a"}', r"p\.json: expected a JSON array of objects, got an object"),
        ("  \n", r"p\.json: expected a JSON array of objects, got an empty file"),
    ],
)
def test_broken_json_array_file(tokenizer, tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(DataValidationError, match=message):
        prompts_module(tokenizer, path).setup()


def test_csv_field_over_the_csv_module_limit_is_an_ordinary_long_prompt(tokenizer, tmp_path):
    huge = "x" * 200_000  # the csv module refuses fields over 131072 characters by default
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,label\na,1\n{huge},2\nb,3\nc,4\nd,5\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"p\.csv, row 2 \(line 3\): prompt has 200000"):
        prompts_module(tokenizer, path, too_long="error").setup()
    module = prompts_module(tokenizer, path, max_prompt_length=8)  # truncate_left keeps the end
    module.setup()
    prompts = {item["prompt"] for item in module.train_items + module.eval_items}
    assert prompts == {"a", "x" * 8, "b", "c", "d"}
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide default is restored


def test_broken_csv_quoting_names_row_and_line(tokenizer, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,label\na,1\n"b"x,2\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"p\.csv, row 2 \(line 3\): invalid CSV"):
        prompts_module(tokenizer, path).setup()


def test_one_row_file_cannot_be_split_into_train_and_eval(tokenizer, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [GOOD[0]])
    expected = (
        r"p\.jsonl: 1 usable row cannot be split into train and eval \(eval_fraction=0\.25 "
        r"takes 1, leaving none to train on\); add rows or give a separate eval_path"
    )
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, path).setup()
    pairs = write_lines(
        tmp_path / "pairs.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}']
    )
    with pytest.raises(DataValidationError, match=r"pairs\.jsonl: 1 usable row cannot be split"):
        pairs_module(tokenizer, pairs).setup()
    module = prompts_module(tokenizer, path, eval_path=str(path))  # with an eval file it works
    module.setup()
    assert [item["prompt"] for item in module.train_items] == ["prompt 0"]


def test_one_row_left_after_skipping_names_the_dropped_rows(tokenizer, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [GOOD[0], '{"text": "b"}'])
    with pytest.raises(DataValidationError, match=r"(?s)1 usable row cannot.*missing_column: 1"):
        prompts_module(tokenizer, path, on_bad_row="skip").setup()


@pytest.mark.parametrize("name", ["data", "data.jsonl"])
def test_directory_given_as_the_data_path(tokenizer, tmp_path, name):
    directory = tmp_path / name
    directory.mkdir()
    write_lines(directory / "train.jsonl", GOOD)
    (directory / "notes.txt").write_text("not data")
    expected = rf"{name}: is a directory, not a data file; data files in it: train\.jsonl"
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, directory).setup()
    train = write_lines(tmp_path / "p.jsonl", GOOD)
    with pytest.raises(DataValidationError, match=rf"{name}: is a directory"):
        prompts_module(tokenizer, train, eval_path=str(directory)).setup()


def test_escaped_surrogate_pair_and_escaped_backslash_are_fine(tokenizer, tmp_path):
    rows = ['{"prompt": "smile \\ud83d\\ude00"}', '{"prompt": "path \\\\ud800"}', *GOOD[:2]]
    module = prompts_module(tokenizer, write_lines(tmp_path / "p.jsonl", rows))
    module.setup()
    prompts = {item["prompt"] for item in module.train_items + module.eval_items}
    assert {"smile \U0001f600", "path \\ud800"} <= prompts
