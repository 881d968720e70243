"""Sample completions in the form each logger shows: a Markdown table in TensorBoard, a table in
W&B, JSON lines in the run's log dir for the other loggers (:func:`log_samples`)."""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

_MARKDOWN_ESCAPES = str.maketrans({c: "\\" + c for c in "\\`*_[]|"})


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell that renders as itself: ``&<>`` as HTML
    entities, Markdown's ``\\ ` * _ [ ] |`` backslash-escaped, line breaks as ``<br>``; floats
    with 3 decimals, None empty."""
    if value is None:
        return ""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    text = html.escape(text, quote=False).translate(_MARKDOWN_ESCAPES)
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``rows``: a column per key (first-seen order), a line per row."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(markdown_cell(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(markdown_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def samples_dir(logger) -> Path | None:
    """Where :func:`log_samples` writes JSON lines for ``logger``: MLflow's local artifact dir of
    the run, else the logger's ``log_dir`` or ``save_dir``; None for a logger with none."""
    if isinstance(logger, MLFlowLogger):
        uri = urlparse(logger.experiment.get_run(logger.run_id).info.artifact_uri)
        return Path(url2pathname(uri.path)) if uri.scheme in ("", "file") else None
    directory = logger.log_dir or logger.save_dir
    return None if directory is None else Path(directory)


def log_samples(logger, tag: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """Log sample completions (``rows``: one dict per sample, e.g. prompt, response, score, kl,
    gold) under ``tag`` at ``step`` in the form ``logger`` shows (:func:`write_samples`). Logs
    every row given; does nothing off global rank 0."""
    from lightning.pytorch.utilities import rank_zero_only

    if rows and rank_zero_only.rank == 0:
        write_samples(logger, tag, rows, step)


@functools.singledispatch
def write_samples(logger, tag: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """Any logger: JSON lines (``step`` + the row) appended to ``<samples_dir>/samples/<tag with
    / as _>.jsonl``; nothing, with a warning, for a logger without a local directory. A logger
    with a table of its own registers its writer (``@write_samples.register``)."""
    from lightning.pytorch.utilities import rank_zero_warn

    directory = samples_dir(logger)
    if directory is None:
        rank_zero_warn(f"{type(logger).__name__} has no local directory: samples not logged")
        return
    path = directory / "samples" / f"{tag.replace('/', '_')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")


@write_samples.register
def _(logger: TensorBoardLogger, tag: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """TensorBoard: a Markdown table in the text panel."""
    logger.experiment.add_text(tag, markdown_table(rows), step)


@write_samples.register
def _(logger: WandbLogger, tag: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
    """W&B: a table (``log_table``), a column per key."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    data = [[row.get(c) for c in columns] for row in rows]
    logger.log_table(key=tag, columns=columns, data=data, step=step)
