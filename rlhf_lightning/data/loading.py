"""Reading rows from local files or hub datasets, with row numbers for every error.

Local files are chosen by extension and parsed here, not by pyarrow's readers, so that a broken
line is reported as `file, line N` instead of a deep stack trace:

- `.jsonl`: one JSON object per line; blank lines are ignored (they are not rows).
- `.json`: a JSON array of objects.
- `.csv`: a header row, then one row per record (values are strings).
- `.parquet`: read with pyarrow.

Anything else that does not exist as a local path is taken as a hub dataset name and loaded with
`datasets.load_dataset(name, split=split)`.

Whole-file problems (missing file, invalid UTF-8, a `.json` file that does not parse) always raise
`DataValidationError`. A single malformed line of a `.jsonl` or `.csv` file (truncated JSON, a
non-object, a ragged CSV row) is a bad row, handled by the `on_bad_row` policy as `malformed`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from rlhf_lightning.data.validation import BadRows, DataValidationError, SourceRow, row_location

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
    if local.suffix in FILE_FORMATS:
        if not local.is_file():
            raise DataValidationError(f"{path}: file not found")
        if local.suffix == ".parquet":
            return _parquet_rows(path)
        text = _read_utf8(local)
        if local.suffix == ".jsonl":
            return _jsonl_rows(path, text, bad_rows)
        if local.suffix == ".json":
            return _json_rows(path, text)
        return _csv_rows(path, text, bad_rows)
    if local.exists():
        raise DataValidationError(f"{path}: unsupported file type; use one of {FILE_FORMATS}")
    return _hub_rows(path, split)


def split_train_eval(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Split `items` into (train, eval) at random (seeded); eval gets round(n * fraction) >= 1."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    num_eval = max(1, round(len(items) * eval_fraction))
    if num_eval >= len(items):
        raise DataValidationError(
            f"cannot split {len(items)} rows into train and eval with eval_fraction={eval_fraction}"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:num_eval])
    train = [item for i, item in enumerate(items) if i not in eval_indices]
    evaluation = [item for i, item in enumerate(items) if i in eval_indices]
    return train, evaluation


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataValidationError(
            f"{path}, line {line}: invalid UTF-8 (byte {data[error.start]:#04x} at offset "
            f"{error.start})"
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
            values = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"invalid JSON: {error.msg} at column {error.colno}"
            bad_rows.reject("malformed", where, message)
            continue
        if not isinstance(values, dict):
            kind = type(values).__name__
            bad_rows.reject("malformed", where, f"expected a JSON object, got {kind}")
            continue
        rows.append(SourceRow(source, number, line_index + 1, values))
    return rows


def _json_rows(source: str, text: str) -> list[SourceRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataValidationError(
            f"{source}, line {error.lineno}: invalid JSON: {error.msg} at column {error.colno}"
        ) from None
    if not isinstance(data, list):
        raise DataValidationError(
            f"{source}: expected a JSON array of objects, got {type(data).__name__}"
        )
    rows = []
    for index, values in enumerate(data):
        if not isinstance(values, dict):
            raise DataValidationError(
                f"{source}, row {index + 1}: expected a JSON object, got {type(values).__name__}"
            )
        rows.append(SourceRow(source, index + 1, None, values))
    return rows


def _csv_rows(source: str, text: str, bad_rows: BadRows) -> list[SourceRow]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataValidationError(f"{source}: empty CSV file (no header row)")
        rows = []
        number = 0
        line = reader.line_num + 1
        for fields in reader:
            if fields:
                number += 1
                if len(fields) != len(header):
                    message = f"expected {len(header)} fields like the header, got {len(fields)}"
                    bad_rows.reject("malformed", row_location(source, number, line), message)
                else:
                    rows.append(SourceRow(source, number, line, dict(zip(header, fields))))
            line = reader.line_num + 1
    except csv.Error as error:
        message = f"{source}, line {reader.line_num}: invalid CSV: {error}"
        raise DataValidationError(message) from None
    return rows


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
