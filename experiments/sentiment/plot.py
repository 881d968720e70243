"""Plot a sentiment PPO run from its TensorBoard event files.

    python experiments/sentiment/plot.py outputs/pipeline/<run> [--out DIR]

Writes ``curves.png`` (held-out learned reward, gold VADER score and KL to the reference against
the PPO iteration, plus the training score and KL) and ``gold_vs_kl.png`` (the gold score against
the KL, one point per eval) into ``--out`` (default ``<run>/plots/``), and prints the eval table
as markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf_lightning.scalars import EVAL_METRICS, eval_rows, read_scalars  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--out", type=Path, default=None, help="where the PNGs go (default: RUN_DIR/plots)"
    )
    args = parser.parse_args(argv)
    out = args.run_dir / "plots" if args.out is None else args.out
    scalars = read_scalars(args.run_dir)
    if not scalars:
        raise SystemExit(f"no TensorBoard event files with scalars under {args.run_dir}")
    rows = eval_rows(scalars)
    out.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        ("reward", [("val/reward", "held-out learned reward"), ("objective/score", "train score")]),
        ("gold VADER score", [("val/gold_score", "held-out gold score")]),
        ("KL to reference (nats / sequence)", [("val/kl", "held-out"), ("kl/sequence", "train")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for tag, label in series:
            points = scalars.get(tag, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if tag.startswith("val/") else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5, 4))
    kl = [r.get("val/kl") for r in rows]
    gold = [r.get("val/gold_score") for r in rows]
    ax.plot(kl, gold, marker="o")
    for r, x, y in zip(rows, kl, gold):
        ax.annotate(str(r["iteration"]), (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("KL to reference (nats / sequence)")
    ax.set_ylabel("gold VADER score (held-out)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=120)

    print("| iteration | learned reward | gold score | KL | response length |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = ["-" if r.get(k) is None else f"{r[k]:.3f}" for k in EVAL_METRICS]
        print(f"| {r['iteration']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
