"""``rlhf-compare SWEEP_DIR``: one table row per run of a sweep, from its overrides and its logs.

A run is a directory with ``.hydra/overrides.yaml`` (what Hydra writes for every job). Each
metric's value is the last one the run logged to TensorBoard (highest step, then latest write),
in its run dir or, for a sweep's job, in the sweep dir's ``tb/<swept values>/``
(``rlhf_lightning.tracking.scalar_events``).
Columns: the overrides whose values differ between the runs, then the metrics (by default each
run's ``task.metric`` and every ``val/*`` metric), then the run's directory.

    rlhf-compare outputs/multirun/ppo/2026-11-21_10-00-00
    rlhf-compare SWEEP_DIR --metrics val/reward,val/kl --format csv
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_lightning.tracking import scalar_events


@dataclass
class Run:
    path: Path  # relative to the sweep dir
    overrides: dict[str, str]  # key -> value as written on the command line
    task_metric: str | None  # cfg.task.metric of the run
    scalars: dict[str, float]  # tag -> last value


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-compare",
        description="Compare the runs of a Hydra sweep: differing overrides and final metrics.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir (outputs/multirun/...) or run")
    parser.add_argument(
        "--metrics",
        help="comma-separated TensorBoard tags (default: each run's task.metric and all val/*)",
    )
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    args = parser.parse_args(argv)

    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: not a directory")
    runs = find_runs(args.sweep_dir)
    if not runs:
        parser.error(f"{args.sweep_dir}: no runs found (no .hydra/overrides.yaml under it)")
    metrics = args.metrics.split(",") if args.metrics else default_metrics(runs)
    header, rows = table(runs, metrics)
    render = format_csv if args.format == "csv" else format_markdown
    sys.stdout.write(render(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
