"""What a proxy reward model learned: how often it ranks a correct answer above a wrong one of the
same held-out problem.

Reads answers the verifier has scored (``rlhf-eval --save-samples`` JSONL rows with ``prompt``,
``response`` and ``reward``: 1 correct, 0 wrong), keeps each distinct (prompt, response) once,
scores them with every proxy (``--proxy DIR``, a reward model saved by ``task=reward_model``),
and reports per proxy:

- ``pair_accuracy``: over every (correct, wrong) pair of answers to the same problem, the
  fraction the proxy orders correctly (a tie counts one half): the held-out analogue of the
  pairs it was trained on, with a 95% bootstrap interval over problems;
- ``auc``: the same over all (correct, wrong) pairs regardless of problem: whether it tells a
  correct answer from a wrong one without the problem to compare against;
- with ``--candidates LOW HIGH``: every integer answer from LOW to HIGH scored on each of the
  first ``--candidate-prompts`` problems; the answers with the highest mean score, and the answer
  the proxy scores highest on each problem (``favourites``: answer -> problems). A proxy that
  learned the arithmetic would favour each problem's own answer; one that learned a prior over
  numbers favours the same answer everywhere.

    python experiments/verifiable/proxy_check.py outputs/family/base_seed*.jsonl \\
        --proxy outputs/overopt_verifiable/rm_64/reward_model --out proxies.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def distinct_answers(rows: list[dict]) -> list[dict]:
    """Each (prompt, response) once, with its verifier score (first seen)."""
    seen = {}
    for row in rows:
        seen.setdefault((row["prompt"], row["response"]), row["reward"])
    return [{"prompt": p, "response": r, "reward": g} for (p, r), g in seen.items()]


def _ordered(good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """(G,), (W,) -> (G, W): 1 where good > bad, 1/2 on a tie, else 0."""
    diff = good[:, None] - bad[None, :]
    return (diff > 0).float() + 0.5 * (diff == 0).float()


def pair_accuracy(
    prompts: list[str], gold: list[float], proxy: list[float], resamples: int = 2000, seed: int = 0
) -> dict:
    """Within-problem pair accuracy with a bootstrap over problems, and the pooled AUC.

    prompts, gold, proxy: one entry per answer; gold 1 (correct) or 0 (wrong)."""
    scores, labels = torch.tensor(proxy, dtype=torch.float64), torch.tensor(gold) > 0.5
    by_problem: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_problem.setdefault(prompt, []).append(i)
    hits, counts = [], []  # per problem with both kinds: ordered pairs, pairs
    for index in by_problem.values():
        index = torch.tensor(index)
        good, bad = scores[index][labels[index]], scores[index][~labels[index]]
        if len(good) and len(bad):
            hits.append(_ordered(good, bad).sum().item())
            counts.append(len(good) * len(bad))
    hits_t, counts_t = torch.tensor(hits), torch.tensor(counts, dtype=torch.float64)
    out = {"problems": len(hits), "pairs": int(counts_t.sum().item()) if hits else 0}
    if hits:
        out["pair_accuracy"] = (hits_t.sum() / counts_t.sum()).item()
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(hits), (resamples, len(hits)), generator=gen)
        boot = (hits_t[pick].sum(1) / counts_t[pick].sum(1)).sort().values
        out["low"] = boot[int(0.025 * (resamples - 1))].item()
        out["high"] = boot[int(0.975 * (resamples - 1))].item()
    good, bad = scores[labels], scores[~labels]
    if len(good) and len(bad):
        out["auc"] = _ordered(good, bad).mean().item()
    return out


def favourite_answers(reward, prompts: list[str], low: int, high: int) -> dict:
    """Every integer answer in [low, high] scored on every prompt: the six best by mean score,
    and how many prompts each answer tops."""
    answers = [f" {n}" for n in range(low, high + 1)]
    scores = reward(
        [p for p in prompts for _ in answers], [a for _ in prompts for a in answers]
    ).view(len(prompts), len(answers))
    mean = scores.mean(0)
    favourites: dict[str, int] = {}
    for index in scores.argmax(1).tolist():
        favourites[answers[index]] = favourites.get(answers[index], 0) + 1
    best = mean.argsort(descending=True)[:6].tolist()
    return {
        "best_mean": {answers[i]: mean[i].item() for i in best},
        "favourites": dict(sorted(favourites.items(), key=lambda kv: -kv[1])),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("answers", type=Path, nargs="+", help="JSONL of prompt, response, reward")
    p.add_argument("--proxy", type=Path, action="append", required=True, help="a reward model")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--candidates", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None)
    p.add_argument("--candidate-prompts", type=int, default=50)
    args = p.parse_args(argv)
    from rlhf_lightning.cli.evaluate import reward_from_config

    rows = distinct_answers(
        [json.loads(line) for path in args.answers for line in path.read_text().splitlines()]
    )
    prompts = [row["prompt"] for row in rows]
    gold = [row["reward"] for row in rows]
    results = {"answers": len(rows), "correct": sum(g > 0.5 for g in gold), "proxies": {}}
    print("| proxy | problems | pairs | pair accuracy [95%] | AUC |")
    print("|---|---|---|---|---|")
    for path in args.proxy:
        reward = reward_from_config(["learned", f"path='{path}'"], "--proxy")  # quoted: any dir
        proxy = reward(prompts, [row["response"] for row in rows]).tolist()
        res = results["proxies"][str(path)] = pair_accuracy(prompts, gold, proxy)
        accuracy = (
            f"{res['pair_accuracy']:.3f} [{res['low']:.3f}, {res['high']:.3f}]"
            if "pair_accuracy" in res
            else "n/a (no problem has a correct and a wrong answer)"
        )
        auc = f"{res['auc']:.3f}" if "auc" in res else "n/a"
        print(f"| {path} | {res['problems']} | {res['pairs']} | {accuracy} | {auc} |")
        if args.candidates:
            problems = list(dict.fromkeys(prompts))[: args.candidate_prompts]
            res["candidates"] = favourite_answers(reward, problems, *args.candidates)
    for path, res in results["proxies"].items():
        if "candidates" in res:
            best = res["candidates"]["best_mean"].items()
            best = ", ".join(f"{a.strip()} ({v:.2f})" for a, v in best)
            tops = res["candidates"]["favourites"].items()
            tops = ", ".join(f"{a.strip()}: {n}" for a, n in tops)
            print(f"{path}: highest mean score {best}; tops the problems {tops}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
