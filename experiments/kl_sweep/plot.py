"""The over-optimisation picture of a KL sweep: proxy (learned) reward and gold score vs KL.

    python experiments/kl_sweep/plot.py RUN_OR_SWEEP_DIR [...] [--out DIR]

Reads every run under the given directories (a run is a directory with ``.hydra/config.yaml``
and TensorBoard event files: sweep dirs, single runs and the main job's run dir all work), takes
one point per held-out eval of every run, and writes ``reward_vs_kl.png`` (learned reward and
gold VADER score against the KL to the reference, a line per run, in the style of Gao et al.
2022) into ``--out`` (default: ``plots/`` inside the first directory given), plus a markdown
table of every eval point on stdout. Runs are labelled by their KL
controller and coefficient (and seed and run length, when the runs differ in them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rlhf_lightning.scalars import eval_rows, read_scalars  # noqa: E402


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every directory holding ``.hydra/config.yaml`` under ``paths`` (each path included)."""
    found = {f.parent.parent for p in paths for f in p.rglob(".hydra/config.yaml")}
    return sorted(found)


def kl_label(cfg) -> tuple[tuple, str]:
    """(sort key, label) of a run from its KL settings, e.g. ``fixed β=0.05``: those of the KL
    in the rewards (``algorithm.kl.reward``; ``algorithm.kl`` itself in runs made before the KL
    penalty had two sites)."""
    kl = cfg.algorithm.kl
    kl = kl.reward if "reward" in kl else kl
    adaptive = "Adaptive" in str(OmegaConf.select(kl, "controller._target_"))
    if adaptive:
        target = float(OmegaConf.select(kl, "controller.target", default=kl.get("target")))
        return (1, target, float(kl.coef)), f"adaptive β0={kl.coef:g} target={target:g}"
    return (0, float(kl.coef), 0.0), f"fixed β={kl.coef:g}"


def iterations(cfg) -> int:
    """The run's iteration count (``budget.num_iterations``; ``algorithm.num_iterations`` in the
    configs of the shipped runs, made before the budget group existed)."""
    return OmegaConf.select(cfg, "budget.num_iterations") or cfg.algorithm.num_iterations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", type=Path, nargs="+", help="sweep or run directories")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the PNG goes (default: FIRST_PATH/plots)"
    )
    args = parser.parse_args(argv)
    out = args.paths[0] / "plots" if args.out is None else args.out
    run_dirs = find_run_dirs(args.paths)
    if not run_dirs:
        raise SystemExit(f"{args.paths}: no runs (no .hydra/config.yaml under them)")
    configs = {d: OmegaConf.load(d / ".hydra" / "config.yaml") for d in run_dirs}
    several_seeds = len({cfg.seed for cfg in configs.values()}) > 1
    several_lengths = len({iterations(cfg) for cfg in configs.values()}) > 1
    runs = []
    for run_dir, cfg in configs.items():
        key, label = kl_label(cfg)
        if several_seeds:
            label += f" seed={cfg.seed}"
        if several_lengths:
            label += f" ({iterations(cfg)} it.)"
        runs.append((key, label, run_dir))

    fig, (ax_proxy, ax_gold) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    print("| run | iteration | KL | learned reward | gold score |")
    print("|---|---|---|---|---|")
    for _, label, run_dir in sorted(runs):
        rows = [r for r in eval_rows(read_scalars(run_dir)) if "val/kl" in r]
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
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "reward_vs_kl.png", dpi=120)


if __name__ == "__main__":
    main()
