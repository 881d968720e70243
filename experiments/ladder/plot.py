"""The ladder study's table and figures: every preset's held-out VADER score and KL along the
run, its wall time, and (with ``--variance``) the variance of its policy-gradient estimate.

Reads every run under the given sweep directories (``rlhf-train experiment=ladder``), labels
each by its ``algorithm.name``, and writes ``ladder.png`` (held-out score vs iteration, KL vs
iteration, score vs KL) and ``ladder.json`` (every number of the table) into ``--out``
(default ``plots/`` inside the first directory); prints a markdown table: final held-out score
and KL, the score at each evaluation, the mean training score of the last 5 iterations,
training wall time (the sum of ``time/iteration``) and seconds per iteration by phase.

    python experiments/ladder/plot.py outputs/ladder/sweep \
        --variance outputs/ladder/grad_variance.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf
from presets import ladder_presets

from rlhf_lightning.scalars import eval_rows, read_scalars

ORDER = ladder_presets()


def runs_under(paths: list[Path]) -> dict[str, Path]:
    runs = {}
    for path in paths:
        for config in path.rglob(".hydra/config.yaml"):
            name = OmegaConf.select(OmegaConf.load(config), "algorithm.name")
            runs[str(name)] = config.parent.parent
    return dict(sorted(runs.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def summarize(run_dir: Path) -> dict:
    scalars = read_scalars(run_dir)
    evals = [r for r in eval_rows(scalars) if "val/reward" in r]

    def series(tag):
        return [value for _, value in scalars.get(tag, [])]

    train = series("objective/score")
    phases = {p: series(f"time/{p}") for p in ("sampling", "scoring", "experience", "update")}
    iteration_s = series("time/iteration")
    return {
        "evals": evals,
        "final_reward": evals[-1]["val/reward"] if evals else None,
        "final_kl": evals[-1].get("val/kl") if evals else None,
        "base_reward": evals[0]["val/reward"] if evals else None,
        "train_score_last5": sum(train[-5:]) / len(train[-5:]) if train else None,
        "iterations": len(iteration_s),
        "train_wall_min": sum(iteration_s) / 60,
        "s_per_iter": {p: sum(v) / len(v) for p, v in phases.items() if v},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--variance", type=Path, default=None, help="grad_variance.py's JSON")
    p.add_argument("--out", type=Path, default=None, help="default: FIRST_PATH/plots")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="a ladder.json of earlier runs: its presets not among PATHS' runs are kept",
    )
    args = p.parse_args(argv)
    runs = {name: summarize(d) for name, d in runs_under(args.paths).items()}
    if args.keep:
        kept = json.loads(args.keep.read_text())
        runs.update({name: r for name, r in kept.items() if name not in runs})
        runs = dict(sorted(runs.items(), key=lambda kv: ORDER.index(kv[0])))
    variance = {}
    if args.variance:
        variance = {r["preset"]: r for r in json.loads(args.variance.read_text())["results"]}

    print(
        "| preset | held-out VADER: start -> end | KL end | train score (last 5) | train min "
        "| s/iter: sample / score / exp / update | grad trace cov | noise/signal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        t = r["s_per_iter"]
        phases = " / ".join(
            f"{t.get(k, 0):.1f}" for k in ("sampling", "scoring", "experience", "update")
        )
        v = variance.get(name, {})
        cov = f"{v['trace_cov']:.3g}" if "trace_cov" in v else "-"
        nts = f"{v['noise_to_signal']:.3g}" if "noise_to_signal" in v else "-"
        print(
            f"| {name} | {r['base_reward']:.3f} -> {r['final_reward']:.3f} | {r['final_kl']:.2f} "
            f"| {r['train_score_last5']:.3f} | {r['train_wall_min']:.1f} | {phases} | {cov} "
            f"| {nts} |"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, r) in enumerate(runs.items()):
        its = [e["iteration"] for e in r["evals"]]
        kl = [e.get("val/kl", 0.0) for e in r["evals"]]
        reward = [e["val/reward"] for e in r["evals"]]
        # Ten colours, then again dashed with squares: every preset its own line.
        style = {"marker": "os"[i // 10 % 2], "linestyle": "-" if i < 10 else "--", "label": name}
        axes[0].plot(its, reward, color=f"C{i % 10}", **style)
        axes[1].plot(its, kl, color=f"C{i % 10}", **style)
        axes[2].plot(kl, reward, color=f"C{i % 10}", **style)
    for ax, (x, y) in zip(
        axes,
        (("iteration", "held-out VADER"), ("iteration", "KL to reference (nats)"),
         ("KL to reference (nats)", "held-out VADER")),
    ):  # fmt: skip
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.paths[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "ladder.png", dpi=110)
    (out / "ladder.json").write_text(json.dumps(runs, indent=1) + "\n")
    return {"runs": runs, "variance": variance}


if __name__ == "__main__":
    main()
