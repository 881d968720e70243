"""The reward-reached table of ``run_reward_reached.sh``: held-out scores of every saved policy.

Reads, under OUT: ``base_eval.json`` (the untouched policy), and for each run NAME (RUNS first,
then any other) that has a ``NAME.json`` (bench_ppo.py / bench_trl.py result) the
``NAME/iter_NNN/eval.json`` files (rlhf-eval of the policy saved after NNN iterations).
Prints one markdown row per evaluated policy and writes ``OUT/reward_reached.json`` with the
same numbers.

    python experiments/benchmarks/reward_table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {  # name (run_reward_reached.sh) -> what it is
    "trl": "TRL 1.12 (separate value model)",
    "ours_critic": "rlhf_lightning, separate critic",
    "ours_critic_trlopt": "rlhf_lightning, separate critic, no clipping, AdamW eps 1e-8",
    "ours_shared": "rlhf_lightning, shared trunk (default)",
    "ours_shared_noclip": "rlhf_lightning, shared trunk, no clipping",
    "ours_shared_trlopt": "rlhf_lightning, shared trunk, no clipping, AdamW eps 1e-8",
    "ours_shared_eps8": "rlhf_lightning, shared trunk, clipping 1.0, AdamW eps 1e-8",
}
HEADER = (
    "| run | iteration | held-out VADER (± SE) | KL to base | distinct-2 | win rate vs base "
    "| train s/iter | peak RSS GiB |\n|---|---|---|---|---|---|---|---|"
)


def _row(name: str, iteration: int, metrics: dict, bench: dict | None) -> dict:
    summary = (bench or {}).get("summary", {})
    rss = summary.get("peak_rss_process_bytes")
    return {
        "run": name,
        "iteration": iteration,
        "reward": metrics["reward"],
        "reward_std_error": metrics.get("reward_std_error"),
        "kl": metrics["kl"],
        "distinct_2": metrics["distinct_2"],
        "win_rate": metrics["win_rate"],
        "s_per_iter": summary.get("iteration_s"),
        "peak_rss_gib": None if rss is None else rss / 2**30,
    }


def collect(out: Path) -> list[dict]:
    """Rows: the base policy (iteration 0), then each run's saved policies in iteration order."""
    base = json.loads((out / "base_eval.json").read_text())["metrics"]
    rows = [_row("base", 0, base, None)]
    others = sorted(p.stem for p in out.glob("*.json") if p.stem not in RUNS)
    for name in [*RUNS, *others]:
        bench_file = out / f"{name}.json"
        if not bench_file.exists() or not (out / name).is_dir():
            continue
        bench = json.loads(bench_file.read_text())
        for eval_file in sorted((out / name).glob("iter_*/eval.json")):
            iteration = int(eval_file.parent.name.removeprefix("iter_"))
            metrics = json.loads(eval_file.read_text())["metrics"]
            rows.append(_row(name, iteration, metrics, bench))
    return rows


def markdown(rows: list[dict]) -> str:
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [HEADER]
    for r in rows:
        score = f"{r['reward']:.3f}"
        if r["reward_std_error"] is not None:
            score += f" ± {r['reward_std_error']:.3f}"
        lines.append(
            f"| {RUNS.get(r['run'], r['run'])} | {r['iteration']} | {score} | {r['kl']:.2f} "
            f"| {r['distinct_2']:.3f} | {r['win_rate']:.3f} | {num(r['s_per_iter'], '.1f')} "
            f"| {num(r['peak_rss_gib'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: reward_table.py OUT")
    out = Path(argv[0])
    rows = collect(out)
    (out / "reward_reached.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
