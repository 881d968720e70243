"""How the cost of an iteration grows with response length and rollout batch, and whether it
stays flat over a long run (no leak, no slow-down).

On a small random Llama with the character tokenizer (4 layers, hidden 256, 4.0 M parameters:
small enough for this machine, large enough that the matmuls, not Python, take the time), runs
``bench_ppo.py`` (default ``ppo``, 2 epochs, two minibatches per epoch, responses of a fixed
length: no stop token) for

- response lengths 32, 64, 128, 256 at a rollout batch of 16;
- rollout batches 8, 16, 32, 64 at 64 tokens;

each in its own process (so its peak RSS is its own), one warm-up and ``--iterations`` timed
iterations; then fits ``s/iter ~ a * x^k`` by least squares in log-log space for each sweep
(k = 1: linear; k = 2: quadratic) and per phase. Then ``--long`` iterations of one run on the
tiny model, with the time and RSS of every iteration, and the least-squares slope of both over
the run. Writes ``cost_growth.json`` and ``cost_growth.png`` into ``--out``.

    python experiments/benchmarks/cost_growth.py --out outputs/cost_growth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = (32, 64, 128, 256)
BATCHES = (8, 16, 32, 64)
SMALL_LLAMA = {
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
    "max_position_embeddings": 512,
}


def fit_power(xs: list[float], ys: list[float]) -> dict:
    """Least-squares fit of ``log y = log a + k log x``: the exponent k and the factor a."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return {"exponent": k, "factor": math.exp(my - k * mx)}


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares ``y = intercept + slope * x``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return {"slope": slope, "intercept": my - slope * mx}


def bench(out: Path, name: str, policy: str, args: argparse.Namespace, **sizes) -> dict:
    """One bench_ppo.py run in its own process (skipped when its JSON exists)."""
    result = out / f"{name}.json"
    if not result.is_file():
        batch, tokens, iterations = sizes["batch"], sizes["tokens"], sizes["iterations"]
        command = [
            sys.executable, str(HERE / "bench_ppo.py"), "--policy", policy,
            "--reward", "token_fraction", "target=e", "--batch", str(batch),
            "--minibatch", str(batch // 2), "--micro", str(min(8, batch // 2)),
            "--epochs", "2", "--new-tokens", str(tokens), "--stop-token", "none",
            "--iterations", str(iterations), "--warmup", "1", "--threads", str(args.threads),
            "--matmul-size", "1024", "--json", str(result),
        ]  # fmt: skip
        subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(result.read_text())


def summary_row(run: dict, **where) -> dict:
    s = run["summary"]
    return {
        **where,
        "s_per_iter": s["iteration_s"],
        "rollout_s": s["rollout_s"],
        "experience_s": s["experience_s"],
        "update_s": s["update_s"],
        "peak_rss_gib": s["peak_rss_process_bytes"] / 2**30,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per point")
    p.add_argument("--long", type=int, default=100, help="iterations of the stability run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "small_llama"
    if not (model / "config.json").is_file():
        from rlhf_lightning.models.tiny import make_tiny_model_dir

        make_tiny_model_dir(model, **SMALL_LLAMA)

    lengths = [
        summary_row(bench(args.out, f"len_{n}", str(model), args, batch=16, tokens=n,
                          iterations=args.iterations), tokens=n)
        for n in LENGTHS
    ]  # fmt: skip
    batches = [
        summary_row(bench(args.out, f"batch_{b}", str(model), args, batch=b, tokens=64,
                          iterations=args.iterations), batch=b)
        for b in BATCHES
    ]  # fmt: skip
    fits = {}
    for sweep, rows, x in (("length", lengths, "tokens"), ("batch", batches, "batch")):
        xs = [r[x] for r in rows]
        fits[sweep] = {
            key: fit_power(xs, [r[key] for r in rows])
            for key in ("s_per_iter", "rollout_s", "experience_s", "update_s")
        }
        fits[sweep]["peak_rss_gib"] = fit_line(xs, [r["peak_rss_gib"] for r in rows])

    long_run = bench(args.out, "long", "builtin:tiny", args, batch=8, tokens=32,
                     iterations=args.long)  # fmt: skip
    its = long_run["iterations"][1:]  # after the warm-up
    steps = list(range(len(its)))
    times = [it["iteration_s"] for it in its]
    rss = [it["rss_bytes"] / 2**20 for it in its]
    stability = {
        "iterations": len(its),
        "s_per_iter_first10": sum(times[:10]) / len(times[:10]),
        "s_per_iter_last10": sum(times[-10:]) / len(times[-10:]),
        "s_per_iter_fit": fit_line(steps, times),
        "rss_mib_first": rss[0],
        "rss_mib_last": rss[-1],
        "rss_mib_fit": fit_line(steps, rss),
    }
    result = {"lengths": lengths, "batches": batches, "fits": fits, "stability": stability}
    (args.out / "cost_growth.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, times, rss, args.out / "cost_growth.png")
    print(json.dumps({"fits": fits, "stability": stability}, indent=1))
    return result


def plot(result: dict, times: list[float], rss: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, rows, x, label in (
        (axes[0], result["lengths"], "tokens", "response length (tokens), batch 16"),
        (axes[1], result["batches"], "batch", "rollout batch, 64 tokens"),
    ):
        xs = [r[x] for r in rows]
        for key in ("s_per_iter", "rollout_s", "experience_s", "update_s"):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per iteration")
        twin = ax.twinx()
        twin.plot(xs, [r["peak_rss_gib"] for r in rows], "k--", marker="x", label="peak RSS")
        twin.set_ylabel("peak RSS (GiB)")
        ax.legend(fontsize=7, loc="upper left")
    axes[2].plot(times, label="s/iter")
    axes[2].set_xlabel("iteration (tiny model, batch 8, 32 tokens)")
    axes[2].set_ylabel("seconds")
    twin = axes[2].twinx()
    twin.plot(rss, "k--", label="RSS")
    twin.set_ylabel("RSS (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
