"""The over-optimisation picture of a KL sweep: proxy (learned) reward and gold score vs KL.

    python experiments/kl_sweep/plot.py outputs/multirun/sentiment_kl_sweep/<time> [--out DIR]

Reads every run of the sweep (each job dir holds ``.hydra/overrides.yaml`` and TensorBoard event
files), takes one point per held-out eval of every run, and writes ``reward_vs_kl.png`` (learned
reward and gold VADER score against the KL to the reference, a line per run, in the style of Gao
et al. 2022) plus a markdown table of every eval point on stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf_lightning.cli.compare import differing_keys, find_runs  # noqa: E402
from rlhf_lightning.tracking import eval_rows, read_scalars  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    runs = find_runs(args.sweep_dir)
    if not runs:
        raise SystemExit(f"{args.sweep_dir}: no runs (no .hydra/overrides.yaml under it)")
    keys = differing_keys(runs) or ["path"]

    fig, (ax_proxy, ax_gold) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    print("| run | iteration | KL | learned reward | gold score |")
    print("|---|---|---|---|---|")
    for run in runs:
        label = ",".join(f"{k}={run.overrides.get(k, '-')}" for k in keys if k != "path")
        label = label or str(run.path)
        rows = [r for r in eval_rows(read_scalars(args.sweep_dir / run.path)) if "val/kl" in r]
        kl = [r["val/kl"] for r in rows]
        for ax, tag in ((ax_proxy, "val/reward"), (ax_gold, "val/gold_score")):
            ax.plot(kl, [r.get(tag) for r in rows], marker="o", label=label)
        for r in rows:
            cells = [r.get(t) for t in ("val/kl", "val/reward", "val/gold_score")]
            text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            print(f"| {label} | {r['iteration']} | {text} |")
    for ax, title in ((ax_proxy, "learned (proxy) reward"), (ax_gold, "gold VADER score")):
        ax.set_title(title)
        ax.set_xlabel("KL to reference (nats / sequence), held-out")
        ax.grid(alpha=0.3)
    ax_gold.legend(fontsize=7)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "reward_vs_kl.png", dpi=120)


if __name__ == "__main__":
    main()
