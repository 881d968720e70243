"""``rlhf-compare SWEEP_DIR``: the runs of a sweep side by side, grouped by seed, with intervals.

A run is a directory with ``.hydra/overrides.yaml`` (what Hydra writes for every job). Each
metric's value is the last one the run logged to TensorBoard (highest step, then latest write),
in its run dir or, for a sweep's job, in the sweep dir's ``tb/<swept values>/``
(``rlhf_lightning.scalars.scalar_events``).

Three tables (``--format md`` prints every one that applies; ``--format csv`` the one named by
``--table``):

- ``runs``: a row per run: the overrides whose values differ between the runs, the metrics (by
  default each run's ``task.metric`` and every ``val/*`` metric), the run's directory.
- ``groups``: runs that differ only by ``seed`` form a group, named by its other differing
  overrides (``tracking.group_name``, the ``group`` column of TensorBoard's HParams tab). A row
  per group: its seeds and, per metric, the mean and interval over seeds (Student's t).
  With ``--per-prompt FILE:COLUMN`` (a JSON-lines file in every run dir, a row per held-out
  prompt, e.g. ``rlhf-eval --samples``), also the mean and interval over seeds x prompts (a
  bootstrap drawing both).
- ``pairs``: every two groups compared on the first metric: the difference of the means, its
  interval and the p-value of "no difference" (Welch's t-test over seeds; with
  ``--per-prompt``, also the bootstrap over seeds x prompts), and whether they differ at the
  level ``1 - --confidence``. `rlhf_lightning.significance` holds the statistics.

    rlhf-compare outputs/multirun/ppo/2026-11-21_10-00-00
    rlhf-compare SWEEP_DIR --metrics val/reward,val/kl --format csv --table groups
    rlhf-compare SWEEP_DIR --per-prompt heldout.jsonl:reward
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_lightning.scalars import scalar_events
from rlhf_lightning.significance import (
    Difference,
    Interval,
    crossed_bootstrap_difference,
    crossed_bootstrap_interval,
    t_interval,
    welch_test,
)
from rlhf_lightning.tracking import SEED_KEY, group_name


@dataclass
class Run:
    path: Path  # relative to the sweep dir
    overrides: dict[str, str]  # key -> value as written on the command line
    task_metric: str | None  # cfg.task.metric of the run
    scalars: dict[str, float]  # tag -> last value
    per_prompt: list[tuple[str, float]] | None = None  # (prompt, score) per held-out prompt


def parse_override(line: str) -> tuple[str, str]:
    """``"+a.b=1"`` -> ``("a.b", "1")``; a deletion ``"~a"`` -> ``("a", "~")``."""
    key, sep, value = line.partition("=")
    return key.lstrip("+~"), value if sep else "~"


def last_scalars(run_dir: Path) -> dict[str, float]:
    """The last value of every scalar tag in the TensorBoard event files under ``run_dir``.

    "Last" is the highest (step, wall time): a resumed run that logs a step again wins.
    """
    last: dict[str, tuple[int, float, float]] = {}  # tag -> (step, wall_time, value)
    for tag, step, wall_time, value in scalar_events(run_dir):
        if tag not in last or (step, wall_time) > last[tag][:2]:
            last[tag] = (step, wall_time, value)
    return {tag: value for tag, (_, _, value) in last.items()}


def natural_key(path: Path) -> list:
    """Sort key that orders ``2_x`` before ``10_x`` (sweep jobs by number)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every run under ``sweep_dir`` (or ``sweep_dir`` itself), in job-number order."""
    runs = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml"), key=natural_key):
        run_dir = overrides_file.parent.parent
        config_file = run_dir / ".hydra" / "config.yaml"
        config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
        lines = OmegaConf.load(overrides_file) or []
        runs.append(
            Run(
                path=run_dir.relative_to(sweep_dir),
                overrides=dict(parse_override(str(line)) for line in lines),
                task_metric=OmegaConf.select(config, "task.metric"),
                scalars=last_scalars(run_dir),
            )
        )
    return runs


def differing_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({key for run in runs for key in run.overrides})
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def default_metrics(runs: list[Run]) -> list[str]:
    task_metrics = [run.task_metric for run in runs if run.task_metric]
    val = sorted({tag for run in runs for tag in run.scalars if tag.startswith("val/")})
    return list(dict.fromkeys([*task_metrics, *val]))


def table(runs: list[Run], metrics: list[str]) -> tuple[list[str], list[list]]:
    """Header and rows: differing overrides, metrics (None when a run lacks one), run dir."""
    keys = differing_keys(runs)
    header = [*keys, *metrics, "run"]
    rows = [
        [
            *(run.overrides.get(k) for k in keys),
            *(run.scalars.get(m) for m in metrics),
            str(run.path),
        ]
        for run in runs
    ]
    return header, rows


def format_markdown(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_csv(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


def read_per_prompt(run_dir: Path, spec: str) -> list[tuple[str, float]] | None:
    """``(prompt, score)`` of each row of ``run_dir/FILE``, score the row's ``COLUMN``
    (``spec = "FILE:COLUMN"``); None when the run has no such file. Raises ValueError naming
    the file and line of a row without a number in ``COLUMN``."""
    name, _, column = spec.rpartition(":")
    path = run_dir / name
    if not path.is_file():
        return None
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            score = row[column]
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise TypeError(f"{column!r} is {score!r}, not a number")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        rows.append((str(row.get("prompt", number)), float(score)))
    return rows


@dataclass
class Group:
    name: str
    runs: list[Run]

    @property
    def seeds(self) -> list[str]:
        return [run.overrides.get(SEED_KEY, "-") for run in self.runs]

    def values(self, metric: str) -> list[float]:
        """The metric's last value in each run that logged it."""
        return [run.scalars[metric] for run in self.runs if metric in run.scalars]

    def score_matrix(self) -> list[list[float]] | None:
        """The per-prompt scores, a row per run, when every run has them for the same prompts
        in the same order; else None."""
        rows = [run.per_prompt for run in self.runs]
        if not rows or any(row is None for row in rows):
            return None
        prompts = [prompt for prompt, _ in rows[0]]
        if any([prompt for prompt, _ in row] != prompts for row in rows):
            return None
        return [[score for _, score in row] for row in rows]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs that differ only by ``seed``, in order of their first run."""
    keys = differing_keys(runs)
    groups: dict[str, Group] = {}
    for run in runs:
        name = group_name({key: run.overrides.get(key) for key in keys})  # the seed left out
        groups.setdefault(name, Group(name, [])).runs.append(run)
    return list(groups.values())


def _cell(interval: Interval | None) -> str | None:
    if interval is None:
        return None
    if math.isnan(interval.low):
        return f"{interval.mean:.4g} (n={interval.n})"
    return f"{interval.mean:.4g} [{interval.low:.4g}, {interval.high:.4g}]"


def group_table(
    groups: list[Group], metrics: list[str], per_prompt: str | None, confidence: float
) -> tuple[list[str], list[list]]:
    """A row per group: name, runs, seeds, per metric "mean [low, high]" over seeds, and with
    ``per_prompt`` the same over seeds x prompts."""
    header = ["group", "runs", "seeds", *metrics]
    if per_prompt:
        header.append(f"{per_prompt} (seeds x prompts)")
    rows = []
    for group in groups:
        row = [group.name, len(group.runs), " ".join(group.seeds)]
        for metric in metrics:
            values = group.values(metric)
            row.append(_cell(t_interval(values, confidence)) if values else None)
        if per_prompt:
            matrix = group.score_matrix()
            interval = crossed_bootstrap_interval(matrix, confidence) if matrix else None
            row.append(_cell(interval))
        rows.append(row)
    return header, rows


def pair_table(
    groups: list[Group], metric: str, per_prompt: str | None, confidence: float
) -> tuple[list[str], list[list]]:
    """A row per test of every two groups: a, b, what was compared and how, mean(a) - mean(b),
    its interval, p, and whether p < 1 - confidence."""
    header = ["a", "b", "compared", "test", "a - b", "interval", "p", "differ"]
    rows = []
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            tests: list[tuple[str, Difference | None]] = []
            values_a, values_b = a.values(metric), b.values(metric)
            if values_a and values_b:
                tests.append((metric, welch_test(values_a, values_b, confidence)))
            if per_prompt:
                matrix_a, matrix_b = a.score_matrix(), b.score_matrix()
                same = matrix_a and matrix_b and _same_prompts(a, b)
                difference = (
                    crossed_bootstrap_difference(matrix_a, matrix_b, confidence) if same else None
                )
                tests.append((per_prompt, difference))
            for compared, d in tests:
                if d is None or math.isnan(d.p):
                    rows.append([a.name, b.name, compared, "-", None, None, None, "untested"])
                    continue
                differ = "yes" if d.p < 1 - confidence else "no"
                interval = f"[{d.low:.4g}, {d.high:.4g}]"
                rows.append([a.name, b.name, compared, d.test, d.diff, interval, d.p, differ])
    return header, rows


def _same_prompts(a: Group, b: Group) -> bool:
    return [p for p, _ in a.runs[0].per_prompt] == [p for p, _ in b.runs[0].per_prompt]


TABLES = ("runs", "groups", "pairs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-compare",
        description="Compare the runs of a Hydra sweep: differing overrides and final metrics, "
        "runs grouped by seed with intervals, and tests between the groups.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir (outputs/multirun/...) or run")
    parser.add_argument(
        "--metrics",
        help="comma-separated TensorBoard tags (default: each run's task.metric and all val/*); "
        "the groups are tested on the first",
    )
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument(
        "--table", choices=TABLES, default="runs", help="the table --format csv prints"
    )
    parser.add_argument(
        "--per-prompt",
        metavar="FILE:COLUMN",
        help="per-prompt scores: COLUMN of the JSON lines in each run dir's FILE (e.g. "
        "heldout.jsonl:reward, written by rlhf-eval --samples)",
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="level of the intervals (default 0.95)"
    )
    args = parser.parse_args(argv)

    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: not a directory")
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.per_prompt is not None and not args.per_prompt.rpartition(":")[0]:
        parser.error(f"--per-prompt: expected FILE:COLUMN, got {args.per_prompt!r}")
    runs = find_runs(args.sweep_dir)
    if not runs:
        parser.error(f"{args.sweep_dir}: no runs found (no .hydra/overrides.yaml under it)")
    if args.per_prompt:
        try:
            for run in runs:
                run.per_prompt = read_per_prompt(args.sweep_dir / run.path, args.per_prompt)
        except ValueError as error:
            parser.error(str(error))
    metrics = args.metrics.split(",") if args.metrics else default_metrics(runs)
    groups = group_runs(runs)
    tables = {
        "runs": table(runs, metrics),
        "groups": group_table(groups, metrics, args.per_prompt, args.confidence),
        "pairs": pair_table(groups, metrics[0], args.per_prompt, args.confidence)
        if metrics
        else ([], []),
    }
    if args.format == "csv":
        sys.stdout.write(format_csv(*tables[args.table]))
        return 0
    sys.stdout.write(format_markdown(*tables["runs"]))
    if any(len(group.runs) > 1 for group in groups):
        level = f"{args.confidence:.0%}"
        sys.stdout.write(
            f"\nGroups (runs that differ only by seed): mean and {level} interval over seeds "
            "(Student's t, n - 1 degrees of freedom)"
        )
        if args.per_prompt:
            sys.stdout.write(
                f"; {args.per_prompt}: over seeds x held-out prompts (bootstrap of both)"
            )
        sys.stdout.write("\n\n" + format_markdown(*tables["groups"]))
        if len(groups) > 1 and metrics:
            sys.stdout.write(
                f"\nPairs: a - b on {metrics[0]}"
                + (f" and {args.per_prompt}" if args.per_prompt else "")
                + f"; differ: p < {1 - args.confidence:.2g}\n\n"
            )
            sys.stdout.write(format_markdown(*tables["pairs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
