"""Gold and proxy reward against sqrt(KL) for the runs of an over-optimisation sweep, one curve
per proxy reward model (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

Reads every run under the given directories (a run is a directory with ``.hydra/config.yaml``
and TensorBoard events), takes one point per held-out evaluation (``val/reward``: the proxy,
``val/gold_score``: the gold, ``val/kl``: KL to the reference in nats per response), and labels
each run by the directory name of its proxy (``reward.path``'s parent, e.g. ``rm_100``). Runs of
one proxy that differ by seed make one curve: at each evaluation the mean over seeds with its
95% t-interval (horizontal bars: sqrt KL, vertical: the score). The intervals are over seeds
only: every run is evaluated on the same held-out prompts, so they speak for those prompts. A
run with fewer evaluations than the longest run of its proxy (unfinished, or crashed) is left out
and named. Per proxy, the evaluation where the mean gold is highest, how far each seed's gold
rose from the first evaluation to there and fell from there to the last; a turn when the
intervals of both lie above 0 (one seed has no interval, so it never shows one).

Writes ``gold_proxy_vs_sqrt_kl.png`` and ``overopt.json`` into ``--out`` (default ``plots/``
inside the first directory) and prints a markdown table of every evaluation::

    python experiments/overopt/plot.py outputs/overopt/sweep --out outputs/overopt/plots
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_lightning.scalars import eval_rows, read_scalars
from rlhf_lightning.significance import Interval, t_interval

EVAL_TAGS = {"val/reward", "val/gold_score", "val/kl"}


def runs_under(paths: list[Path]) -> list[Path]:
    return sorted({p.parent.parent for path in paths for p in path.rglob(".hydra/config.yaml")})


def proxy_label(run_dir: Path) -> str:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    path = OmegaConf.select(cfg, "reward.path")
    return Path(str(path)).parent.name if path else run_dir.name


def run_points(run_dir: Path) -> list[dict]:
    """One run's evaluations: iteration, proxy, gold, kl, sqrt_kl, in iteration order."""
    return [
        {
            "iteration": row["iteration"],
            "proxy": row["val/reward"],
            "gold": row["val/gold_score"],
            "kl": row["val/kl"],
            "sqrt_kl": math.sqrt(max(row["val/kl"], 0.0)),
        }
        for row in eval_rows(read_scalars(run_dir))
        if set(row) >= EVAL_TAGS
    ]


def runs_by_proxy(paths: list[Path]) -> dict[str, dict[Path, list[dict]]]:
    """Proxy label -> its runs (one per seed): run dir -> evaluation points."""
    out: dict[str, dict[Path, list[dict]]] = {}
    for run_dir in runs_under(paths):
        points = run_points(run_dir)
        if points:
            out.setdefault(proxy_label(run_dir), {})[run_dir] = points
    return out


def complete_runs(runs: dict[Path, list[dict]]) -> tuple[list[list[dict]], list[Path]]:
    """The runs with as many evaluations as the longest run of the proxy, and the others."""
    longest = max(len(points) for points in runs.values())
    kept = [points for points in runs.values() if len(points) == longest]
    return kept, [run_dir for run_dir, points in runs.items() if len(points) < longest]


def mean_curve(runs: list[list[dict]]) -> list[dict]:
    """At each iteration every run evaluated: the number of runs and the t-interval over them
    of ``proxy``, ``gold`` and ``sqrt_kl``."""
    by_iteration = [{pt["iteration"]: pt for pt in run} for run in runs]
    shared = sorted(set.intersection(*(set(d) for d in by_iteration)))
    return [
        {
            "iteration": it,
            "seeds": len(runs),
            **{
                key: t_interval([d[it][key] for d in by_iteration])
                for key in ("proxy", "gold", "sqrt_kl")
            },
        }
        for it in shared
    ]


def gold_turn(runs: list[list[dict]], curve: list[dict]) -> dict:
    """Where the mean gold peaks, each seed's rise from the first evaluation to that peak and
    its fall from the peak to the last evaluation, with t-intervals over seeds (nan bounds for
    one seed). A turn: both the rise and the fall are above 0 beyond the seeds' spread. The peak
    is picked on the same runs, so both intervals lean towards finding one. ``curve``: the
    runs' ``mean_curve``."""
    peak = max(curve, key=lambda c: c["gold"].mean)
    first, last = curve[0]["iteration"], curve[-1]["iteration"]
    rises, falls = [], []
    for run in runs:
        gold = {pt["iteration"]: pt["gold"] for pt in run}
        rises.append(gold[peak["iteration"]] - gold[first])
        falls.append(gold[peak["iteration"]] - gold[last])
    rise, fall = t_interval(rises), t_interval(falls)
    return {
        "peak_iteration": peak["iteration"],
        "peak_gold": peak["gold"],
        "peak_sqrt_kl": peak["sqrt_kl"],
        "first_iteration": first,
        "last_iteration": last,
        "rise": rise,
        "fall": fall,
        "turned": rise.low > 0 and fall.low > 0,  # nan (one seed) compares False
    }


def turn_sentence(label: str, turn: dict) -> str:
    seeds = turn["fall"].n
    if turn["peak_iteration"] == turn["first_iteration"]:
        return (
            f"{label}: the mean gold never rises above its start ({_fmt(turn['peak_gold'])}); "
            f"by iteration {turn['last_iteration']} it is {_fmt(turn['fall'])} lower"
        )
    rise = (
        f"{label}: the mean gold rises {_fmt(turn['rise'])} to {_fmt(turn['peak_gold'])} at "
        f"iteration {turn['peak_iteration']} (sqrt KL {turn['peak_sqrt_kl'].mean:.2f})"
    )
    if turn["peak_iteration"] == turn["last_iteration"]:
        return f"{rise}, its last evaluation: no fall"
    if seeds < 2:
        verdict = "one seed, no interval"
    else:
        verdict = "a turn" if turn["turned"] else "no turn the seeds support"
    return (
        f"{rise}, then falls {_fmt(turn['fall'])} by iteration {turn['last_iteration']}: {verdict}"
    )


def _fmt(i: Interval) -> str:
    if math.isnan(i.low):
        return f"{i.mean:.3f}"
    return f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def _jsonable(value):
    """Intervals as dicts, nan as null (strict JSON)."""
    if isinstance(value, Interval):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=None, help="default: FIRST_PATH/plots")
    p.add_argument("--gold-name", default="gold score", help="the gold's name on the axis")
    args = p.parse_args(argv)
    data = runs_by_proxy(args.paths)
    if not data:
        raise SystemExit(f"{args.paths}: no runs with evaluations")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    print("| proxy | iteration | seeds | sqrt KL | proxy reward | gold |")
    print("|---|---|---|---|---|---|")
    curves, turns, left_out = {}, {}, []
    for label, all_runs in sorted(data.items()):
        runs, short = complete_runs(all_runs)
        left_out += [str(run_dir) for run_dir in short]
        curve = curves[label] = mean_curve(runs)
        xs = [c["sqrt_kl"] for c in curve]
        for ax, key in ((ax_gold, "gold"), (ax_proxy, "proxy")):
            ys = [c[key] for c in curve]
            ax.errorbar(
                [x.mean for x in xs],
                [y.mean for y in ys],
                xerr=[[x.mean - x.low for x in xs], [x.high - x.mean for x in xs]],
                yerr=[[y.mean - y.low for y in ys], [y.high - y.mean for y in ys]],
                marker="o",
                capsize=3,
                label=f"{label} ({len(runs)} seeds)",
            )
        for c in curve:
            print(
                f"| {label} | {c['iteration']} | {c['seeds']} | {_fmt(c['sqrt_kl'])} "
                f"| {_fmt(c['proxy'])} | {_fmt(c['gold'])} |"
            )
        turns[label] = gold_turn(runs, curve)
    for ax, name in ((ax_gold, args.gold_name), (ax_proxy, "proxy reward (learned)")):
        ax.set_xlabel("sqrt(KL to the reference), nats^0.5")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_gold.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.paths[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "gold_proxy_vs_sqrt_kl.png", dpi=120)
    print()
    for label, turn in sorted(turns.items()):
        print(turn_sentence(label, turn))
    for run_dir in left_out:
        print(f"left out (fewer evaluations than the other runs of its proxy): {run_dir}")
    result = {"curves": curves, "turns": turns, "left_out": left_out}
    text = json.dumps(_jsonable(result), indent=1, allow_nan=False)
    (out / "overopt.json").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
