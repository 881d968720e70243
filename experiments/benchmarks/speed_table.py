"""The speed table of ``run_speed_side_by_side.sh``: medians over interleaved runs, ratios to TRL.

Reads, under OUT, the result files ``VARIANT_rK.json`` (bench_ppo.py / bench_trl.py, round K)
and prints one markdown row per variant:

- s/iter of each run (the run's mean over its timed iterations) and their median;
- speed ratio = TRL's median / the variant's median (above 1: faster than TRL);
- paired ratios = TRL's s/iter / the variant's, round by round (rounds both have): on this
  machine the speed of a process drifts by up to 30%, and runs of the same round ran back to back;
- peak RSS (the process's high-water mark) of each run, and memory ratio = the variant's median
  peak / TRL's (below 1: smaller).

Writes the same numbers to ``OUT/speed_side_by_side.json``.

    python experiments/benchmarks/speed_table.py OUT
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

BASELINE = "trl"
RESULT_FILE = re.compile(r"^(?P<variant>.+)_r(?P<round>\d+)\.json$")
HEADER = (
    "| variant | s/iter per run | median s/iter | speed ratio vs TRL | paired ratios "
    "| peak RSS GiB per run | memory ratio vs TRL |\n|---|---|---|---|---|---|---|"
)


def collect(out: Path) -> dict[str, dict[int, dict]]:
    """variant -> round -> (s/iter, peak RSS bytes) of every ``VARIANT_rK.json`` under ``out``."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob("*_r*.json")):
        match = RESULT_FILE.match(path.name)
        if match is None:
            continue
        summary = json.loads(path.read_text())["summary"]
        runs.setdefault(match["variant"], {})[int(match["round"])] = {
            "s_per_iter": summary["iteration_s"],
            "peak_rss_bytes": summary["peak_rss_process_bytes"],
        }
    return runs


def summarize(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per variant (TRL first): medians, the ratios to TRL's medians and paired ratios."""
    if BASELINE not in runs:
        raise ValueError(f"no {BASELINE}_rK.json result: nothing to compare with")
    base = runs[BASELINE]
    base_time = statistics.median(r["s_per_iter"] for r in base.values())
    base_rss = statistics.median(r["peak_rss_bytes"] for r in base.values())
    rows = []
    for variant in [BASELINE, *sorted(v for v in runs if v != BASELINE)]:
        rounds = runs[variant]
        order = sorted(rounds)
        times = [rounds[k]["s_per_iter"] for k in order]
        rss = [rounds[k]["peak_rss_bytes"] for k in order]
        median_time = statistics.median(times)
        rows.append(
            {
                "variant": variant,
                "rounds": order,
                "s_per_iter": times,
                "median_s_per_iter": median_time,
                "speed_ratio": base_time / median_time,
                "paired_ratios": [
                    base[k]["s_per_iter"] / rounds[k]["s_per_iter"] for k in order if k in base
                ],
                "peak_rss_gib": [b / 2**30 for b in rss],
                "memory_ratio": statistics.median(rss) / base_rss,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    def join(values, fmt):
        return ", ".join(format(v, fmt) for v in values)

    lines = [HEADER]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {join(r['s_per_iter'], '.1f')} | {r['median_s_per_iter']:.1f} "
            f"| {r['speed_ratio']:.2f}x | {join(r['paired_ratios'], '.2f')} "
            f"| {join(r['peak_rss_gib'], '.2f')} | {r['memory_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: speed_table.py OUT")
    out = Path(argv[0])
    rows = summarize(collect(out))
    (out / "speed_side_by_side.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
