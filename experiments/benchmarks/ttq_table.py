"""Time to quality from ``run_time_to_quality.sh``'s runs: the training wall time at which each
run's saved policy first reaches the held-out gold target, and the curves of gold vs wall time.

Reads, under OUT: ``base_eval.json`` (the untouched policy) and, for each run NAME, ``NAME.json``
(bench_ppo.py / bench_trl.py: the wall time of every iteration) and ``NAME/iter_NNN/eval.json``
(rlhf-eval of the policy saved after NNN iterations). A snapshot reaches the target when its
held-out score is at least ``--gain`` above the base's and its KL to the base is at most
``--max-kl``; its wall time is the sum of the run's iteration times up to it (loading and saving
excluded). Writes ``OUT/time_to_quality.json`` and ``OUT/gold_vs_time.png`` (or ``--png``) and
prints a markdown table. Snapshots come every few iterations, so the target was crossed between
the last snapshot below it and the first one over it: the table gives both wall times.

    python experiments/benchmarks/ttq_table.py OUT [--runs "trl ours_ppo"] [--gain 0.3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {
    "trl": "TRL 1.12 PPO",
    "ours_ppo": "ours, ppo",
    "ours_rloo": "ours, rloo",
    "ours_grpo": "ours, grpo",
    "ours_lora": "ours, ppo + LoRA r=16",
}


def snapshots(out: Path, name: str) -> list[dict]:
    """(iteration, wall_s, gold, gold SE, KL) of every evaluated snapshot of run ``name``."""
    bench = json.loads((out / f"{name}.json").read_text())
    times = [it["iteration_s"] for it in bench["iterations"]]
    rows = []
    for eval_file in sorted((out / name).glob("iter_*/eval.json")):
        iteration = int(eval_file.parent.name.removeprefix("iter_"))
        metrics = json.loads(eval_file.read_text())["metrics"]
        rows.append(
            {
                "iteration": iteration,
                "wall_s": sum(times[:iteration]),
                "gold": metrics["reward"],
                "gold_se": metrics.get("reward_std_error"),
                "kl": metrics["kl"],
            }
        )
    return sorted(rows, key=lambda r: r["iteration"])


def time_to_quality(rows: list[dict], target: float, max_kl: float) -> dict | None:
    """The first snapshot (in iteration order) with gold >= target and KL <= max_kl."""
    return next((r for r in rows if r["gold"] >= target and r["kl"] <= max_kl), None)


def collect(out: Path, runs: list[str], gain: float, max_kl: float) -> dict:
    base = json.loads((out / "base_eval.json").read_text())["metrics"]
    target = base["reward"] + gain
    result = {
        "base_gold": base["reward"],
        "base_gold_se": base.get("reward_std_error"),
        "target": target,
        "max_kl": max_kl,
        "runs": {},
    }
    for name in runs:
        if not (out / f"{name}.json").is_file():
            continue
        rows = snapshots(out, name)
        reached = time_to_quality(rows, target, max_kl)
        run = {"snapshots": rows, "reached": reached}
        run["seconds_to_target"] = run["seconds_last_miss"] = None
        if reached is not None:
            run["seconds_to_target"] = reached["wall_s"]
            # The target was crossed after the last snapshot that missed it (or after the start).
            misses = [r["wall_s"] for r in rows if r["iteration"] < reached["iteration"]]
            run["seconds_last_miss"] = max(misses, default=0.0)
        result["runs"][name] = run
    trl = result["runs"].get("trl", {}).get("seconds_to_target")
    for run in result["runs"].values():
        mine = run["seconds_to_target"]
        run["ratio_to_trl"] = mine / trl if mine is not None and trl else None
    return result


def markdown(result: dict) -> str:
    lines = [
        f"base gold {result['base_gold']:.3f}, target {result['target']:.3f} "
        f"(KL <= {result['max_kl']:g})",
        "",
        "| run | time to target | last snapshot below it | iteration | gold there | KL there "
        "| time / TRL's | last gold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        hit, last = run["reached"], run["snapshots"][-1] if run["snapshots"] else None
        ratio = "-" if run["ratio_to_trl"] is None else f"{run['ratio_to_trl']:.2f}"
        if hit is None:
            span = f"not reached in {last['wall_s'] / 60:.1f} min" if last else "no snapshots"
            cells = [span, "-", "-", "-", "-"]
        else:
            cells = [
                f"{hit['wall_s'] / 60:.1f} min",
                f"{run['seconds_last_miss'] / 60:.1f} min",
                str(hit["iteration"]),
                f"{hit['gold']:.3f}",
                f"{hit['kl']:.1f}",
            ]
        last_gold = "-" if last is None else f"{last['gold']:.3f} (it. {last['iteration']})"
        lines.append(
            f"| {LABELS.get(name, name)} | " + " | ".join([*cells, ratio, last_gold]) + " |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in result["runs"].items():
        rows = run["snapshots"]
        xs = [0.0] + [r["wall_s"] / 60 for r in rows]
        ys = [result["base_gold"]] + [r["gold"] for r in rows]
        errors = [result.get("base_gold_se") or 0.0] + [r["gold_se"] or 0.0 for r in rows]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=2, label=LABELS.get(name, name))
    ax.axhline(result["target"], color="grey", linestyle="--", label="base + gain")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("held-out VADER (gold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--runs", default=" ".join(LABELS), help="run names, space separated")
    p.add_argument("--gain", type=float, default=0.30)
    p.add_argument("--max-kl", type=float, default=8.0)
    p.add_argument("--png", type=Path, default=None, help="default: OUT/gold_vs_time.png")
    args = p.parse_args(argv)
    result = collect(args.out, args.runs.split(), args.gain, args.max_kl)
    (args.out / "time_to_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.png or args.out / "gold_vs_time.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
