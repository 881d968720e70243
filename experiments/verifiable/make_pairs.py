"""Preference pairs labelled by a verifier: a correct and an incorrect answer to the same problem.

For reward over-optimisation with an exact gold: a proxy reward model trained by Bradley-Terry
on these pairs stands in for the verifier, and the verifier stays the gold. The policy
(``--policy``, the starting policy of the runs) answers each of the first ``--problems`` training
problems of a prompt config ``--samples`` times (``--temperature``, at most ``--max-new-tokens``
tokens ending at ``--stop-token``); the reward (``--reward``, a config of ``conf/reward/``)
scores every answer. A problem whose answers all score the same gives no pair; otherwise up to
``--pairs-per-problem`` pairs, each a distinct best-scored answer (chosen) against a distinct
lower-scored one (rejected), drawn with ``--seed``. Only training problems are used: the
held-out problems stay for the gold.

Writes ``--out/pairs.jsonl`` (``prompt``, ``chosen``, ``rejected``: what
``data/preferences`` reads) and ``--out/summary.json`` (problems, answers, their mean score,
problems with a pair, pairs)::

    python experiments/verifiable/make_pairs.py --out outputs/overopt_verifiable/pairs \\
        --problems 512 --samples 8
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path


def pairs_of(
    prompt: str, answers: Sequence[str], scores: Sequence[float], limit: int, rng: random.Random
) -> list[dict]:
    """Up to ``limit`` pairs ``{"prompt", "chosen", "rejected"}`` from one problem's answers:
    chosen among the distinct answers with the highest score, rejected among the distinct
    answers scored lower; none when every answer scores the same."""
    best = max(scores)
    chosen = sorted({a for a, s in zip(answers, scores, strict=True) if s == best})
    rejected = sorted({a for a, s in zip(answers, scores, strict=True) if s < best})
    combos = [(c, r) for c in chosen for r in rejected]
    rng.shuffle(combos)
    return [{"prompt": prompt, "chosen": c, "rejected": r} for c, r in combos[:limit]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="builtin:smollm2", help="who answers")
    p.add_argument(
        "--data",
        nargs="+",
        default=["reasoning_gym_chain_sum"],
        metavar="ARG",
        help="CONFIG [KEY=VALUE ...] of conf/data/prompts/ (its training split is answered)",
    )
    p.add_argument(
        "--reward",
        nargs="+",
        default=["reasoning_gym"],
        metavar="ARG",
        help="CONFIG [KEY=VALUE ...] of conf/reward/: the label",
    )
    p.add_argument("--problems", type=int, default=512, help="the first N training problems")
    p.add_argument("--samples", type=int, default=8, help="answers per problem")
    p.add_argument("--pairs-per-problem", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--stop-token", default="\n")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name in ("problems", "samples", "pairs_per_problem", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hydra.utils import instantiate

    from rlhf_lightning.cli.evaluate import compose_prompt_config, reward_from_config
    from rlhf_lightning.config import GenerationConfig
    from rlhf_lightning.data.tokenize import ChatPrompt
    from rlhf_lightning.evaluation import generate_texts, load_policy_for_inference

    reward = reward_from_config(args.reward)
    prompt_cfg = compose_prompt_config(args.data)
    lm, tokenizer = load_policy_for_inference(args.policy)
    module = instantiate(prompt_cfg, tokenizer=tokenizer, batch_size=1)
    module.setup()
    items = module.train_items[: args.problems]
    prompts = [ChatPrompt(item["prompt"], item["input_ids"]) for item in items]
    columns = {name: [item["columns"][name] for item in items] for name in module.column_names}
    gen = GenerationConfig(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, stop_token=args.stop_token
    )
    answers, scores = [], []  # [sample][problem]
    for sample in range(args.samples):
        texts = generate_texts(lm, tokenizer, prompts, gen, args.batch_size, args.seed + sample)
        answers.append(texts)
        scores.append(reward(list(prompts), texts, **columns).tolist())
    rng = random.Random(args.seed)
    pairs = []
    for i, prompt in enumerate(prompts):
        mine = [answers[s][i] for s in range(args.samples)]
        mine_scores = [scores[s][i] for s in range(args.samples)]
        pairs += pairs_of(str(prompt), mine, mine_scores, args.pairs_per_problem, rng)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(pair) + "\n" for pair in pairs)
    flat = [score for row in scores for score in row]
    summary = {
        "problems": len(prompts),
        "answers": len(flat),
        "mean_score": sum(flat) / len(flat),
        "problems_with_a_pair": len({pair["prompt"] for pair in pairs}),
        "pairs": len(pairs),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))
    return summary


if __name__ == "__main__":
    main()
