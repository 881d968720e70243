"""Row checks that run before anything trains, and the `on_bad_row` policy that applies them.

Every message names the source and the row: `data/train.jsonl, row 7 (line 8): ...`. Rows are
numbered from 1 in data order (a CSV header and blank lines are not rows); the file line, where
the format has lines, is given in parentheses.

A check raises `BadRow(reason, message)`; `BadRows` then either raises `DataValidationError` at
the first bad row (`on_bad_row="error"`) or drops the row and counts it under `reason`
(`on_bad_row="skip"`), logging the counts and the first few places per reason.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhf_lightning.errors import UserError

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
EXAMPLES_PER_REASON = 5

T = TypeVar("T")


class DataValidationError(UserError, ValueError):
    """A data file or row that cannot be used; the message names the source and the row."""


class BadRow(Exception):
    """Raised by a row check: `reason` is the counter key, `message` the human explanation."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SourceRow:
    """One data row as read from its source."""

    source: str  # file path or hub dataset name
    number: int  # 1-based data row
    line: int | None  # 1-based file line where the row starts; None for json, parquet, hub
    values: dict[str, Any]

    def where(self) -> str:
        return row_location(self.source, self.number, self.line)


def row_location(source: str, number: int, line: int | None) -> str:
    """`<source>, row <number> (line <line>)`, without the line part when it is unknown."""
    line_part = f" (line {line})" if line is not None else ""
    return f"{source}, row {number}{line_part}"


class BadRows:
    """Applies `on_bad_row`: raise at the first bad row (`error`) or drop and count it (`skip`)."""

    def __init__(self, on_bad_row: str) -> None:
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def reject(self, reason: str, where: str, message: str) -> None:
        """Handle one bad row found at `where` (a file and row/line description)."""
        if self.on_bad_row == "error":
            raise DataValidationError(f"{where}: {message}")
        self.drop(reason, where, message)

    def drop(self, reason: str, where: str, message: str) -> None:
        """Count a dropped row whatever the policy (e.g. a prompt dropped by `too_long="drop"`)."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{where}: {message}")

    def summary(self) -> str:
        lines = [f"{reason}: {count}" for reason, count in sorted(self.counts.items())]
        for reason in sorted(self.examples):
            lines += [f"  e.g. {example}" for example in self.examples[reason]]
        return "\n".join(lines)

    def log_summary(self, what: str) -> None:
        if self.counts:
            total = sum(self.counts.values())
            log.warning("%s: dropped %d rows\n%s", what, total, self.summary())


def keep_good_rows(
    rows: Iterable[SourceRow], parse: Callable[[SourceRow], T], bad_rows: BadRows
) -> list[tuple[SourceRow, T]]:
    """(row, parse(row)) for every row whose `parse` does not raise `BadRow`."""
    kept = []
    for row in rows:
        try:
            kept.append((row, parse(row)))
        except BadRow as bad:
            bad_rows.reject(bad.reason, row.where(), bad.message)
    return kept


def drop_duplicates(
    items: list[tuple[SourceRow, T]], key: Callable[[T], Hashable], bad_rows: BadRows
) -> list[tuple[SourceRow, T]]:
    """Keep the first of each group of items with equal `key`; later ones are bad rows."""
    first_seen: dict[Hashable, SourceRow] = {}
    kept = []
    for row, item in items:
        k = key(item)
        if k in first_seen:
            message = f"exact duplicate of row {first_seen[k].number}"
            bad_rows.reject("duplicate", row.where(), message)
        else:
            first_seen[k] = row
            kept.append((row, item))
    return kept


def read_value(row: SourceRow, column: str) -> Any:
    """`row[column]`, or `BadRow` naming the columns the row does have."""
    if column not in row.values:
        found = ", ".join(repr(name) for name in row.values) or "none"
        raise BadRow("missing_column", f"missing column {column!r} (found columns: {found})")
    return row.values[column]


def read_text(row: SourceRow, column: str) -> str:
    """`row[column]` if it is a string with some non-whitespace character; else `BadRow`."""
    value = read_value(row, column)
    if not isinstance(value, str):
        kind = type(value).__name__
        raise BadRow("not_a_string", f"column {column!r} must be a string, got {kind} {value!r}")
    if not value.strip():
        raise BadRow("empty_text", f"column {column!r} is empty or whitespace only")
    return value


CHAT_ROLES = ("system", "user", "assistant")


def read_messages(row: SourceRow, column: str) -> tuple[tuple[str, str], ...]:
    """`row[column]` as a chat: ((role, content), ...), or `BadRow("bad_messages")`.

    A chat is a non-empty list of {"role", "content"} objects, each role one of `CHAT_ROLES` and
    each content a string; the last message is from the user (the policy answers it) and is not
    blank. Other keys of a message are ignored.
    """
    value = read_value(row, column)
    if not isinstance(value, list) or not value:
        shown = "an empty list" if value == [] else f"{type(value).__name__} {value!r:.60}"
        raise BadRow("bad_messages", f"column {column!r} must be a list of messages, got {shown}")
    chat = []
    for number, message in enumerate(value, start=1):
        where = f"column {column!r}, message {number}"
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise BadRow(
                "bad_messages", f"{where} must be an object with 'role' and 'content', got {kind}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            roles = ", ".join(repr(name) for name in CHAT_ROLES)
            raise BadRow("bad_messages", f"{where} has role {role!r}; a role is one of {roles}")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise BadRow(
                "bad_messages", f"{where} must have a string 'content', got {kind} {content!r:.60}"
            )
        chat.append((role, content))
    if chat[-1][0] != "user":
        message = f"column {column!r}: the last message must be from the user, got {chat[-1][0]!r}"
        raise BadRow("bad_messages", message)
    if not chat[-1][1].strip():
        raise BadRow(
            "empty_text", f"column {column!r}: the last message is empty or whitespace only"
        )
    return tuple(chat)


def read_margin(row: SourceRow, column: str) -> float:
    """`row[column]` as a finite float (numbers, or numeric strings as read from CSV)."""
    value = read_value(row, column)
    number = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not math.isfinite(number):
        raise BadRow("bad_margin", f"column {column!r} must be a finite number, got {value!r}")
    return number


def require_rows(items: list, what: str, bad_rows: BadRows) -> None:
    """Raise if validation left nothing to train or evaluate on."""
    if not items:
        raise DataValidationError(f"{what}: no usable rows{dropped_rows_note(bad_rows)}")


def dropped_rows_note(bad_rows: BadRows) -> str:
    """`; dropped rows:` and the summary of `bad_rows`, or "" when none were dropped."""
    return f"; dropped rows:\n{bad_rows.summary()}" if bad_rows.counts else ""


TOO_LONG = ("truncate_left", "drop", "error")


def fit_prompt_length(token_ids: list[int], max_length: int, too_long: str) -> list[int]:
    """Apply a `too_long` policy to a prompt's token ids.

    Prompts within `max_length` come back unchanged; `truncate_left` keeps the last `max_length`
    tokens; `drop` and `error` raise `BadRow("prompt_too_long")` and leave the choice between
    dropping the row and raising to the caller.
    """
    if len(token_ids) <= max_length:
        return token_ids
    if too_long == "truncate_left":
        return token_ids[-max_length:]
    message = f"prompt has {len(token_ids)} tokens, more than max_prompt_length={max_length}"
    raise BadRow("prompt_too_long", message)
