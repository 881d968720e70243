"""Reading rows from local files or hub datasets, with row numbers for every error.

Local files are chosen by extension and parsed here, not by pyarrow's readers, so that a broken
line is reported as `file, line N` instead of a deep stack trace:

- `.jsonl`: one JSON object per line; blank lines are ignored (they are not rows).
- `.json`: a JSON array of objects.
- `.csv`: a header row, then one row per record (values are strings).
- `.parquet`: read with pyarrow.

Anything else that does not exist as a local path is taken as a hub dataset name and loaded with
`datasets.load_dataset(name, split=split)`.

Whole-file problems (missing file, a directory, invalid UTF-8, a `.json` array or a CSV quoting
that does not parse) always raise `DataValidationError`, naming the row where there is one. A
single bad row is handled by the `on_bad_row` policy: a malformed `.jsonl` line (truncated JSON,
nesting deeper than Python's reader allows, an integer longer than `int()` accepts) or a
non-object (`malformed`), a ragged CSV row (`malformed`), a key repeated within one JSON object
(`duplicate_key`: which value is meant is ambiguous), a lone UTF-16 surrogate from a JSON `\\u`
escape (`invalid_unicode`: tokenizers cannot encode it). CSV fields may be of any length.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

from rlhf_lightning.data.validation import (
    BadRow,
    BadRows,
    DataValidationError,
    SourceRow,
    dropped_rows_note,
    row_location,
)

SHIPPED_PREFIX = "shipped:"
FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")

# rlhf_lightning/data/loading.py -> the repository root, which holds `experiments/`.
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


def resolve_data_path(path: str) -> str:
    """Resolve a data path from config.

    `shipped:<relative path>` names a file shipped in the repository's `experiments/` directory
    (e.g. `shipped:sentiment/data/prompts_train.jsonl`), found from this package's location, so
    configs work from any working directory. This needs the package used from a source checkout
    (e.g. `pip install -e .`). Any other string is returned unchanged: a path relative to the
    current directory, an absolute path, or a hub dataset name.
    """
    if not path.startswith(SHIPPED_PREFIX):
        return path
    if not EXPERIMENTS_DIR.is_dir():
        raise DataValidationError(
            f"{path}: shipped data lives in the repository's experiments/ directory, which is not "
            f"at {EXPERIMENTS_DIR}; use the package from a source checkout (pip install -e .)"
        )
    return str(EXPERIMENTS_DIR / path.removeprefix(SHIPPED_PREFIX))


def load_rows(path: str, split: str, bad_rows: BadRows) -> list[SourceRow]:
    """All rows of a local file (by extension) or of split `split` of a hub dataset."""
    local = Path(path)
    if local.is_dir():
        data_files = sorted(p.name for p in local.iterdir() if p.suffix in FILE_FORMATS)
        found = (
            f"data files in it: {', '.join(data_files)}" if data_files else "it holds no data file"
        )
        raise DataValidationError(f"{path}: is a directory, not a data file; {found}")
    if local.suffix in FILE_FORMATS:
        if not local.is_file():
            raise DataValidationError(f"{path}: file not found")
        if local.suffix == ".parquet":
            return _parquet_rows(path)
        text = _read_utf8(local)
        if local.suffix == ".jsonl":
            return _jsonl_rows(path, text, bad_rows)
        if local.suffix == ".json":
            return _json_rows(path, text, bad_rows)
        return _csv_rows(path, text, bad_rows)
    if local.exists():
        raise DataValidationError(f"{path}: unsupported file type; use one of {FILE_FORMATS}")
    return _hub_rows(path, split)


def split_train_eval(
    items: list, eval_fraction: float, seed: int, source: str, bad_rows: BadRows
) -> tuple[list, list]:
    """Split `items` into (train, eval) at random (seeded); eval gets round(n * fraction) >= 1.

    Raises `DataValidationError` naming `source` (and the rows `bad_rows` dropped) when that
    would leave nothing to train on.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    num_eval = max(1, round(len(items) * eval_fraction))
    if num_eval >= len(items):
        rows = f"{len(items)} usable row{'s' if len(items) != 1 else ''}"
        raise DataValidationError(
            f"{source}: {rows} cannot be split into train and eval (eval_fraction="
            f"{eval_fraction} takes {num_eval}, leaving none to train on); add rows or give a "
            f"separate eval_path{dropped_rows_note(bad_rows)}"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:num_eval])
    train = [item for i, item in enumerate(items) if i not in eval_indices]
    evaluation = [item for i, item in enumerate(items) if i in eval_indices]
    return train, evaluation


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataValidationError(f"{path}: cannot read it: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataValidationError(
            f"{path}, line {line}: invalid UTF-8 (byte {data[error.start]:#04x} at offset "
            f"{error.start})"
        ) from None


class _RowDecoder(json.JSONDecoder):
    """A JSON decoder that records the keys repeated within one object (plain `json` keeps the
    last value silently)."""

    def __init__(self) -> None:
        super().__init__(object_pairs_hook=self._object)
        self.repeated_keys: list[str] = []

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        values = dict(pairs)
        if len(values) < len(pairs):
            seen: set[str] = set()
            self.repeated_keys += [key for key, _ in pairs if key in seen or seen.add(key)]
        return values


def _decode_json(text: str, start: int | None = None) -> tuple[Any, int, list[str]]:
    """Decode the JSON value of `text` (start=None: all of it) or at `text[start:]`.

    Returns (value, index after it, keys repeated within one of its objects). Raises
    `json.JSONDecodeError` for a syntax error and `BadRow("malformed")` for a value Python's
    reader cannot get through: nesting past the recursion limit, or an integer of more than
    `sys.get_int_max_str_digits()` digits.
    """
    decoder = _RowDecoder()
    try:
        if start is None:
            value, end = decoder.decode(text), len(text)
        else:
            value, end = decoder.raw_decode(text, start)
    except RecursionError:
        message = "invalid JSON: nested too deeply for Python's reader (its recursion limit)"
        raise BadRow("malformed", message) from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # the only other error json raises: int() refuses that many digits
        limit = sys.get_int_max_str_digits()
        raise BadRow(
            "malformed", f"invalid JSON: an integer with more than {limit} digits"
        ) from None
    return value, end, decoder.repeated_keys


# A JSON escape of a UTF-16 surrogate: the only way one gets into a decoded string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _row_values(value: Any, repeated_keys: list[str], text: str, start: int, end: int) -> dict:
    """The decoded `value` of `text[start:end]` as a row, or `BadRow`: not an object, a key
    repeated within one object (which value is meant?), or a lone UTF-16 surrogate."""
    if not isinstance(value, dict):
        raise BadRow("malformed", f"expected a JSON object, got {type(value).__name__}")
    if repeated_keys:
        message = f"key {repeated_keys[0]!r} appears twice in one JSON object (which is meant?)"
        raise BadRow("duplicate_key", message)
    if _SURROGATE_ESCAPE.search(text, start, end):
        _check_no_lone_surrogate(value)
    return value


def _check_no_lone_surrogate(values: dict[str, Any]) -> None:
    """`BadRow` naming the column if any string in `values` holds a lone UTF-16 surrogate."""
    for column, value in values.items():
        pending = [column, value]
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                pending += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                pending += item
            elif isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise BadRow(
                        "invalid_unicode",
                        f"column {column!r} holds a lone UTF-16 surrogate "
                        f"\\u{ord(item[error.start]):04x} (character {error.start + 1}), which "
                        "is not valid Unicode (a JSON \\u escape of half a surrogate pair)",
                    ) from None


def _jsonl_rows(source: str, text: str, bad_rows: BadRows) -> list[SourceRow]:
    rows = []
    number = 0
    # Split on "\n" only: str.splitlines() would also split inside strings holding U+2028.
    for line_index, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        number += 1
        where = row_location(source, number, line_index + 1)
        try:
            value, end, repeated_keys = _decode_json(line)
            values = _row_values(value, repeated_keys, line, 0, end)
        except json.JSONDecodeError as error:
            message = f"invalid JSON: {error.msg} at column {error.colno}"
            bad_rows.reject("malformed", where, message)
            continue
        except BadRow as bad:
            bad_rows.reject(bad.reason, where, bad.message)
            continue
        rows.append(SourceRow(source, number, line_index + 1, values))
    return rows


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_rows(source: str, text: str, bad_rows: BadRows) -> list[SourceRow]:
    """The objects of a JSON array, read one element at a time so that each gets its row and
    line. An element that is not an object, or holds a repeated key or a lone surrogate, is a
    bad row; a syntax error, or an element the reader cannot get through, stops the file."""
    position = _JSON_WHITESPACE.match(text).end()
    if not text.startswith("[", position):
        kind = "an empty file" if position == len(text) else f"text starting {text[position]!r}"
        kind = "an object" if text.startswith("{", position) else kind
        raise DataValidationError(f"{source}: expected a JSON array of objects, got {kind}")
    position = _JSON_WHITESPACE.match(text, position + 1).end()
    rows: list[SourceRow] = []
    number = 0
    line, line_start = 1, 0  # the line of text[line_start], counted forward as rows are read
    while not text.startswith("]", position):
        if number:
            if not text.startswith(",", position):
                raise DataValidationError(
                    f"{source}, line {_line_of(text, position)}: invalid JSON: expected ',' or "
                    f"']' after row {number}"
                )
            position = _JSON_WHITESPACE.match(text, position + 1).end()
        number += 1
        line, line_start = line + text.count("\n", line_start, position), position
        where = row_location(source, number, line)
        try:
            value, end, repeated_keys = _decode_json(text, position)
        except json.JSONDecodeError as error:
            raise DataValidationError(
                f"{where}: invalid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
            ) from None
        except BadRow as bad:  # the reader stopped inside the element: its end is unknown
            raise DataValidationError(f"{where}: {bad.message}") from None
        try:
            values = _row_values(value, repeated_keys, text, position, end)
        except BadRow as bad:
            bad_rows.reject(bad.reason, where, bad.message)
        else:
            rows.append(SourceRow(source, number, line, values))
        position = _JSON_WHITESPACE.match(text, end).end()
    if _JSON_WHITESPACE.match(text, position + 1).end() != len(text):
        raise DataValidationError(
            f"{source}, line {_line_of(text, position)}: invalid JSON: extra data after the array"
        )
    return rows


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _csv_rows(source: str, text: str, bad_rows: BadRows) -> list[SourceRow]:
    # The csv module refuses fields over 128 KiB by default; here no field can exceed the file.
    default_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        return _read_csv(source, text, bad_rows)
    finally:
        csv.field_size_limit(default_limit)


def _read_csv(source: str, text: str, bad_rows: BadRows) -> list[SourceRow]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise DataValidationError(f"{source}, line 1: invalid CSV header: {error}") from None
    if header is None:
        raise DataValidationError(f"{source}: empty CSV file (no header row)")
    rows = []
    number = 0
    line = reader.line_num + 1
    while True:
        try:
            fields = next(reader, None)
        except csv.Error as error:
            where = row_location(source, number + 1, line)
            raise DataValidationError(f"{where}: invalid CSV: {error}") from None
        if fields is None:
            return rows
        if fields:
            number += 1
            if len(fields) != len(header):
                message = f"expected {len(header)} fields like the header, got {len(fields)}"
                bad_rows.reject("malformed", row_location(source, number, line), message)
            else:
                rows.append(SourceRow(source, number, line, dict(zip(header, fields))))
        line = reader.line_num + 1


def _parquet_rows(source: str) -> list[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as error:
        raise DataValidationError(f"{source}: cannot read parquet file: {error}") from None
    return [SourceRow(source, i + 1, None, values) for i, values in enumerate(table.to_pylist())]


def _hub_rows(name: str, split: str) -> list[SourceRow]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except ConnectionError as error:
        raise DataValidationError(
            f"{name}: not reachable and not in the local cache ({error}); a local path must end "
            f"with one of {FILE_FORMATS}"
        ) from None
    return [SourceRow(name, i + 1, None, values) for i, values in enumerate(dataset.to_list())]
