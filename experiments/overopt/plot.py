"""Gold and proxy reward against sqrt(KL) for the runs of an over-optimisation sweep, one curve
per proxy reward model (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

Reads every run under the given directories (a run is a directory with ``.hydra/config.yaml``
and TensorBoard events), takes one point per held-out evaluation (``val/reward``: the proxy,
``val/gold_score``: VADER, ``val/kl``: KL to the reference in nats per response), labels each run
by the directory name of its proxy (``reward.path``'s parent, e.g. ``rm_100``), and writes
``gold_proxy_vs_sqrt_kl.png`` into ``--out`` (default ``plots/`` inside the first directory).
Prints a markdown table of every point and, per proxy, where the gold score peaks.

    python experiments/overopt/plot.py outputs/overopt/sweep --out outputs/overopt/plots
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_lightning.scalars import eval_rows, read_scalars


def runs_under(paths: list[Path]) -> list[Path]:
    return sorted({p.parent.parent for path in paths for p in path.rglob(".hydra/config.yaml")})


def proxy_label(run_dir: Path) -> str:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    path = OmegaConf.select(cfg, "reward.path")
    return Path(str(path)).parent.name if path else run_dir.name


def curves(paths: list[Path]) -> dict[str, list[dict]]:
    """Proxy label -> eval points (iteration, proxy, gold, kl, sqrt_kl), in iteration order."""
    out = {}
    for run_dir in runs_under(paths):
        points = [
            {
                "iteration": row["iteration"],
                "proxy": row["val/reward"],
                "gold": row["val/gold_score"],
                "kl": row["val/kl"],
                "sqrt_kl": math.sqrt(max(row["val/kl"], 0.0)),
            }
            for row in eval_rows(read_scalars(run_dir))
            if {"val/reward", "val/gold_score", "val/kl"} <= set(row)
        ]
        out[proxy_label(run_dir)] = points
    return out


def gold_peak(points: list[dict]) -> dict:
    """The point of highest gold score, and how far the last point fell below it."""
    best = max(points, key=lambda p: p["gold"])
    return {**best, "fall_after_peak": best["gold"] - points[-1]["gold"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=None, help="default: FIRST_PATH/plots")
    args = p.parse_args(argv)
    data = curves(args.paths)
    if not data:
        raise SystemExit(f"{args.paths}: no runs with evaluations")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    print("| proxy | iteration | sqrt KL | proxy reward | gold (VADER) |")
    print("|---|---|---|---|---|")
    peaks = {}
    for label, points in sorted(data.items()):
        xs = [pt["sqrt_kl"] for pt in points]
        ax_gold.plot(xs, [pt["gold"] for pt in points], marker="o", label=label)
        ax_proxy.plot(xs, [pt["proxy"] for pt in points], marker="o", label=label)
        for pt in points:
            print(
                f"| {label} | {pt['iteration']} | {pt['sqrt_kl']:.2f} | {pt['proxy']:.3f} "
                f"| {pt['gold']:.3f} |"
            )
        peaks[label] = gold_peak(points)
    for ax, name in ((ax_gold, "gold score (VADER)"), (ax_proxy, "proxy reward (learned)")):
        ax.set_xlabel("sqrt(KL to the reference), nats^0.5")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_gold.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or args.paths[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "gold_proxy_vs_sqrt_kl.png", dpi=120)
    print()
    for label, peak in sorted(peaks.items()):
        print(
            f"{label}: gold peaks at {peak['gold']:.3f} (iteration {peak['iteration']}, "
            f"sqrt KL {peak['sqrt_kl']:.2f}); the last point is {peak['fall_after_peak']:.3f} "
            "below the peak"
        )
    return {"curves": data, "peaks": peaks}


if __name__ == "__main__":
    main()
