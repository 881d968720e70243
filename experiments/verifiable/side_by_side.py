"""GRPO in rlhf_lightning beside TRL's GRPOTrainer on chain_sum: time, memory and accuracy.

Reads what ``run_side_by_side.sh`` writes into OUT:

- ``ours_s<seed>/``: an ``rlhf-train`` run (``val/reward`` at each evaluation, the per-problem
  scores of the last one in ``heldout.jsonl``, ``time/iteration`` of every iteration);
- ``trl_s<seed>/``: ``result.json`` of ``trl_grpo.py`` (the wall time of every optimizer step)
  and ``heldout_step<N>.jsonl``, its checkpoints scored by ``rlhf-eval``;
- ``{ours,trl}_s<seed>.time``: ``/usr/bin/time -v`` of each process (peak RSS, wall time).

Training time is each framework's own clock without evaluation and checkpoint writing:
rlhf_lightning's ``time/iteration`` (sampling, scoring, experience, update) summed over
iterations; TRL's time from the start of ``train()`` to the end of each optimizer step. The time
to the target is the training time up to the first evaluation whose accuracy reaches
``--target`` (chosen from the starting policy's accuracy before any run); a seed that never
reaches it has none. Every mean carries its 95 % t-interval over seeds; the accuracy at equal
steps also its crossed bootstrap over seeds x problems, and the difference of the two
frameworks Welch's test over seeds at every evaluation and, at the last, the crossed
bootstrap's::

    python experiments/verifiable/side_by_side.py outputs/side_by_side --target 0.17
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rlhf_lightning.scalars import eval_rows, read_scalars
from rlhf_lightning.significance import (
    crossed_bootstrap_difference,
    crossed_bootstrap_interval,
    t_interval,
    welch_test,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # family.py
from family import per_problem  # noqa: E402


def peak_rss_gb(time_file: Path) -> float:
    """Maximum resident set size in a ``/usr/bin/time -v`` report, in GB (10^9 bytes)."""
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
    if match is None:
        raise ValueError(f"{time_file}: no 'Maximum resident set size' line")
    return int(match.group(1)) * 1024 / 1e9


def ours(run_dir: Path) -> dict:
    """``{"accuracy": {iteration: acc}, "train_s": {iteration: cumulative s}, "scores"}``."""
    scalars = read_scalars(run_dir)
    elapsed, train_s = 0.0, {}
    for iteration, seconds in scalars["time/iteration"]:
        elapsed += seconds
        train_s[iteration + 1] = elapsed  # the step of iteration k's metrics is k - 1
    accuracy = {
        int(row["iteration"]): row["val/reward"]
        for row in eval_rows(scalars)
        if "val/reward" in row and row["iteration"] > 0
    }
    return {
        "accuracy": accuracy,
        "train_s": train_s,
        "scores": per_problem(run_dir / "heldout.jsonl"),
    }


def trl(run_dir: Path) -> dict:
    """The same fields for a ``trl_grpo.py`` run, its checkpoints at iteration boundaries."""
    result = json.loads((run_dir / "result.json").read_text())
    per_iteration = result["steps_per_iteration"]
    steps = result["step_wall_s"]
    train_s = {
        (k + 1) // per_iteration: s for k, s in enumerate(steps) if (k + 1) % per_iteration == 0
    }
    accuracy, scores = {}, None
    for path in sorted(run_dir.glob("heldout_step*.jsonl"), key=lambda p: int(p.stem[12:])):
        step = int(path.stem[len("heldout_step") :])
        scores = per_problem(path)
        accuracy[step // per_iteration] = sum(scores) / len(scores)
    return {"accuracy": accuracy, "train_s": train_s, "scores": scores}


def time_to(run: dict, target: float) -> float | None:
    """Training seconds up to the first evaluation at or above ``target``; None if none is."""
    for iteration in sorted(run["accuracy"]):
        if run["accuracy"][iteration] >= target:
            return run["train_s"][iteration]
    return None


def summarize(out: Path, target: float) -> dict:
    frameworks = {}
    for name, read in (("rlhf_lightning", ours), ("trl", trl)):
        prefix = "ours" if name == "rlhf_lightning" else "trl"
        runs = {}
        for run_dir in sorted(out.glob(f"{prefix}_s*/")):
            seed = int(run_dir.name.split("_s")[-1])
            runs[seed] = read(run_dir) | {
                "peak_rss_gb": peak_rss_gb(out / f"{prefix}_s{seed}.time")
            }
        frameworks[name] = runs
    rows = {}
    for name, runs in frameworks.items():
        seeds = sorted(runs)
        last = max(max(r["accuracy"]) for r in runs.values())
        reached = [time_to(runs[s], target) for s in seeds]
        rows[name] = {
            "seeds": seeds,
            "time_to_target_s": reached,
            "time_to_target": vars(t_interval([t for t in reached if t is not None])),
            "train_s_per_iteration": vars(
                t_interval([runs[s]["train_s"][last] / last for s in seeds])
            ),
            "peak_rss_gb": vars(t_interval([runs[s]["peak_rss_gb"] for s in seeds])),
            "accuracy": {
                it: vars(t_interval([runs[s]["accuracy"][it] for s in seeds]))
                for it in sorted(runs[seeds[0]]["accuracy"])
            },
            "final_seeds_x_problems": vars(
                crossed_bootstrap_interval([runs[s]["scores"] for s in seeds])
            ),
        }
    a, b = frameworks["rlhf_lightning"], frameworks["trl"]
    last = max(a[min(a)]["accuracy"])

    def values(runs: dict, field: str) -> list:
        return [
            run[field][last] if field in ("accuracy", "train_s") else run[field]
            for run in runs.values()
        ]

    def at(runs: dict, iteration: int) -> list[float]:
        return [run["accuracy"][iteration] for run in runs.values()]

    comparison = {
        f"accuracy_iteration_{it}_welch": vars(welch_test(at(a, it), at(b, it)))
        for it in sorted(a[min(a)]["accuracy"])
        if it != last
    }
    comparison |= {
        "accuracy_welch": vars(welch_test(values(a, "accuracy"), values(b, "accuracy"))),
        "accuracy_bootstrap": vars(
            crossed_bootstrap_difference(values(a, "scores"), values(b, "scores"))
        ),
        "train_s_welch": vars(welch_test(values(a, "train_s"), values(b, "train_s"))),
        "peak_rss_welch": vars(welch_test(values(a, "peak_rss_gb"), values(b, "peak_rss_gb"))),
    }
    return {"target": target, "frameworks": rows, "rlhf_lightning_minus_trl": comparison}


def interval(i: dict, digits: int = 3) -> str:
    if i["n"] == 0:
        return "-"
    if i["low"] != i["low"]:  # nan: one value
        return f"{i['mean']:.{digits}f}"
    return f"{i['mean']:.{digits}f} [{i['low']:.{digits}f}, {i['high']:.{digits}f}]"


def markdown(summary: dict) -> str:
    rows = summary["frameworks"]
    iterations = sorted({int(it) for row in rows.values() for it in row["accuracy"]})
    head = ["", "seeds", f"time to {summary['target']} (s)", "train s / iteration", "peak RSS GB"]
    head += [f"accuracy, iteration {it}" for it in iterations] + ["final (seeds x problems)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        reached = ", ".join("-" if t is None else f"{t:.0f}" for t in row["time_to_target_s"])
        cells = [name, " ".join(map(str, row["seeds"]))]
        cells += [f"{interval(row['time_to_target'], 0)} ({reached})"]
        cells += [interval(row["train_s_per_iteration"], 1), interval(row["peak_rss_gb"], 2)]
        cells += [interval(row["accuracy"][it]) for it in iterations]
        cells.append(interval(row["final_seeds_x_problems"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| rlhf_lightning - trl | difference [95%] | p | test |", "|---|---|---|---|"]
    for name, d in summary["rlhf_lightning_minus_trl"].items():
        lines.append(
            f"| {name} | {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {d['p']:.3g} "
            f"| {d['test']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the directory run_side_by_side.sh wrote")
    parser.add_argument("--target", type=float, default=0.17, help="held-out accuracy")
    args = parser.parse_args(argv)
    summary = summarize(args.out, args.target)
    (args.out / "side_by_side.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
