"""The family on the verifiable task: held-out accuracy of each preset over seeds, with intervals.

Reads every run under the given sweep directories (``rlhf-train experiment=verifiable_family``),
groups them by ``algorithm.name``, and takes each run's held-out accuracy at each evaluation
(``val/reward`` in TensorBoard) and its per-problem scores at the last one (``heldout.jsonl``).
The starting policy's accuracy comes from ``rlhf-eval --samples`` files (``--base``, one per
seed). Prints two markdown tables and writes ``family.png`` and ``family.json`` into ``--out``:

- per preset: the seeds, the accuracy at each evaluation as the mean over seeds with its 95 %
  t-interval, the final accuracy's interval over seeds x problems (crossed bootstrap), and the
  change from the starting policy with its interval and p-value (crossed bootstrap over seeds x
  problems: the same 200 problems in every run);
- every two presets: the difference of their final accuracies, its interval and p-value, over
  seeds (Welch) and over seeds x problems (crossed bootstrap), each p-value also Holm-adjusted
  over all the pairs; "differ" is "yes" when both adjusted p-values are below 0.05, "bootstrap
  only" when only the test over seeds x problems is (with 3 seeds, resampling seeds understates
  their spread). The table lists the pairs that differ by either test and counts the rest
  (``--all-pairs``: every pair); the json holds every pair.

Presets appear in the ladder's order (``LADDER``, the order ``experiment=verifiable_family``
sweeps them), any other after them in the order found.

    python experiments/verifiable/family.py outputs/family/lane_a outputs/family/lane_b \
        --base outputs/family/base_seed{0,1,2}.jsonl --out outputs/family
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_lightning.scalars import eval_rows, read_scalars
from rlhf_lightning.significance import (
    crossed_bootstrap_difference,
    crossed_bootstrap_interval,
    t_interval,
    welch_test,
)

RESAMPLES = 20_000  # the bootstrap p-values' resolution, 2 / RESAMPLES: Holm over 78 pairs needs it
FAMILY = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "verifiable_family.yaml"
# The presets in the order the family experiment sweeps them: the ladder, REINFORCE to DAPO.
LADDER = tuple(str(OmegaConf.load(FAMILY).hydra.sweeper.params.algorithm).split(","))


def per_problem(path: Path) -> list[float]:
    """The ``reward`` of every row of a JSON-lines file (``heldout.jsonl``, ``rlhf-eval
    --samples``), in file order."""
    return [float(json.loads(line)["reward"]) for line in path.read_text().splitlines() if line]


def runs_by_preset(
    paths: list[Path], rename: dict[str, str] | None = None
) -> dict[str, list[dict]]:
    """preset -> its runs, each ``{"seed", "evals": {iteration: accuracy}, "scores": [...]}``; a
    run's preset is its ``algorithm.name``, or what ``rename`` maps that name to."""
    rename = rename or {}
    presets: dict[str, list[dict]] = {}
    for path in paths:
        for config_file in sorted(path.rglob(".hydra/config.yaml")):
            run_dir = config_file.parent.parent
            config = OmegaConf.load(config_file)
            heldout = run_dir / "heldout.jsonl"
            if not heldout.is_file():  # a run that did not finish
                continue
            evals = {
                int(row["iteration"]): row["val/reward"]
                for row in eval_rows(read_scalars(run_dir))
                if "val/reward" in row
            }
            name = str(config.algorithm.name)
            presets.setdefault(rename.get(name, name), []).append(
                {"seed": int(config.seed), "evals": evals, "scores": per_problem(heldout)}
            )
    order = sorted(presets, key=lambda name: LADDER.index(name) if name in LADDER else len(LADDER))
    return {name: sorted(presets[name], key=lambda r: r["seed"]) for name in order}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given; a NaN (no test: one seed) stays NaN
    and does not count among the tests."""
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(tested, key=p_values.__getitem__)
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def summarize(presets: dict[str, list[dict]], base: list[list[float]], base_seeds: str) -> dict:
    iterations = sorted({it for runs in presets.values() for r in runs for it in r["evals"]})
    base_means = [sum(scores) / len(scores) for scores in base]
    rows = {}
    for name, runs in presets.items():
        matrix = [r["scores"] for r in runs]
        change = crossed_bootstrap_difference(matrix, base, num_resamples=RESAMPLES)
        rows[name] = {
            "seeds": [r["seed"] for r in runs],
            "by_iteration": {
                it: vars(t_interval([r["evals"][it] for r in runs if it in r["evals"]]))
                for it in iterations
            },
            "final_seeds_x_problems": vars(
                crossed_bootstrap_interval(matrix, num_resamples=RESAMPLES)
            ),
            "change_from_base": vars(change),
        }
    names = list(presets)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            final_a = [r["evals"][iterations[-1]] for r in presets[a]]
            final_b = [r["evals"][iterations[-1]] for r in presets[b]]
            boot = crossed_bootstrap_difference(
                [r["scores"] for r in presets[a]],
                [r["scores"] for r in presets[b]],
                num_resamples=RESAMPLES,
            )
            welch = welch_test(final_a, final_b)
            pairs.append({"a": a, "b": b, "welch": vars(welch), "bootstrap": vars(boot)})
    for test in ("welch", "bootstrap"):
        for pair, adjusted in zip(pairs, holm([p[test]["p"] for p in pairs]), strict=True):
            pair[f"{test}_p_holm"] = adjusted
    return {
        "base": {"seeds": vars(t_interval(base_means)), "seeds_x_problems": vars(
            crossed_bootstrap_interval(base, num_resamples=RESAMPLES))},
        "base_seeds": base_seeds,
        "presets": rows,
        "pairs": pairs,
    }  # fmt: skip


def markdown(summary: dict, all_pairs: bool = False) -> str:
    presets = summary["presets"]
    iterations = sorted({int(it) for row in presets.values() for it in row["by_iteration"]})
    base = summary["base"]
    head = ["preset", "seeds", *(f"iteration {it} (seeds)" for it in iterations)]
    head += ["final (seeds x problems)", "change from start [95%]", "p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = [f"starting policy ({interval_of(base['seeds'])} over seeds)", summary["base_seeds"]]
    start += ["-" for _ in iterations] + [interval_of(base["seeds_x_problems"]), "-", "-"]
    lines.append("| " + " | ".join(start) + " |")
    for name, row in presets.items():
        cells = [name, " ".join(map(str, row["seeds"]))]
        cells += [interval_of(row["by_iteration"][it]) for it in iterations]
        change = row["change_from_base"]
        cells += [interval_of(row["final_seeds_x_problems"]), difference(change)]
        cells.append(p_text(change["p"]))
        lines.append("| " + " | ".join(cells) + " |")
    head = ["a", "b", "a - b (seeds)", "Welch p (Holm)", "a - b (seeds x problems)"]
    head += ["bootstrap p (Holm)", "differ"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    listed = [p for p in summary["pairs"] if all_pairs or verdict(p) != "no"]
    for pair in listed:
        w, b = pair["welch"], pair["bootstrap"]
        cells = [pair["a"], pair["b"], difference(w), f"{w['p']:.3g} ({pair['welch_p_holm']:.3g})"]
        cells += [difference(b), f"{p_text(b['p'])} ({p_text(pair['bootstrap_p_holm'])})"]
        cells.append(verdict(pair))
        lines.append("| " + " | ".join(cells) + " |")
    rest = len(summary["pairs"]) - len(listed)
    if rest:
        lines += ["", f"The other {rest} pairs: no Holm-adjusted p below 0.05 in either test."]
    return "\n".join(lines) + "\n"


def interval_of(i: dict) -> str:
    return f"{i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"


def verdict(pair: dict) -> str:
    """ "yes" when both Holm-adjusted tests reject "no difference" at 0.05; "bootstrap only"
    when the test over seeds x problems does and the one over seeds does not; else "no"."""
    welch, boot = pair["welch_p_holm"] < 0.05, pair["bootstrap_p_holm"] < 0.05
    return "yes" if welch and boot else "bootstrap only" if boot else "no"


def p_text(p: float) -> str:
    """A p-value; a bootstrap's 0 as below its resolution, 2 / ``RESAMPLES``."""
    return f"< {2 / RESAMPLES:.2g}" if p == 0 else f"{p:.3g}"


def difference(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def plot(summary: dict, path: Path) -> None:
    """One row per preset (the ladder from the top): its held-out accuracy at each evaluation,
    the mean over seeds with its 95 % t-interval, beside the starting policy's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = summary["presets"]
    iterations = sorted({int(it) for row in presets.values() for it in row["by_iteration"]})
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(presets)))
    base = summary["base"]["seeds"]
    ax.axvspan(base["low"], base["high"], color="0.85", label="starting policy (95%)")
    ax.axvline(base["mean"], color="0.5", lw=1)
    for k, it in enumerate(iterations):
        shift = (k - (len(iterations) - 1) / 2) * 0.25
        ys, means, errors = [], [], [[], []]
        for y, row in enumerate(presets.values()):
            v = row["by_iteration"].get(it) or row["by_iteration"].get(str(it))
            if v is None:
                continue
            ys.append(y + shift)
            means.append(v["mean"])
            errors[0].append(v["mean"] - v["low"])
            errors[1].append(v["high"] - v["mean"])
        ax.errorbar(means, ys, xerr=errors, fmt="o", capsize=3, label=f"iteration {it}")
    ax.set_yticks(range(len(presets)), list(presets))
    ax.invert_yaxis()
    ax.set_xlabel("held-out accuracy (200 problems), mean over seeds, 95% t-interval")
    ax.set_title("chain_sum, SmolLM2-135M; an iteration: 4 steps, 32 responses")
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.5 / len(presets)), ncol=3, frameon=False
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories")
    parser.add_argument(
        "--base",
        nargs="+",
        type=Path,
        required=True,
        help="rlhf-eval --samples files of the starting policy, one per seed",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the png and json")
    parser.add_argument("--all-pairs", action="store_true", help="list every pair in the table")
    parser.add_argument(
        "--rename",
        nargs="+",
        default=[],
        metavar="NAME=LABEL",
        help="show the runs of algorithm.name NAME as LABEL (names swap at once: a=b b=a)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    base = [per_problem(p) for p in args.base]
    rename = dict(pair.split("=", 1) for pair in args.rename)
    runs = runs_by_preset(args.sweeps, rename)
    summary = summarize(runs, base, " ".join(p.stem for p in args.base))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "family.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out / "family.png")
    print(markdown(summary, args.all_pairs))
    return summary


if __name__ == "__main__":
    main()
