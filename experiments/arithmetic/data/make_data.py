"""Build the arithmetic task's prompts (few-shot additions with the answer in a column) and
preference pairs (the right answer chosen over a wrong one).

Each prompt shows ``--shots`` solved additions of ``--terms`` numbers drawn from
0..``--max-operand``, then an unsolved one, in the form

    Q: 3 + 5 = ?
    A: 8
    Q: 4 + 9 = ?
    A:

and its row carries the sum as ``answer``. The reward (`experiments/arithmetic/reward.py`) checks
the first number of the response against it. Prompts are drawn with ``random.Random(--seed)``
and deduplicated; the first ``--num-eval`` distinct prompts are the eval prompts, the next
``--num-train`` the train prompts (no prompt text is in both; questions repeat, since there are
only so many sums). Each prompt also gets a preference pair (``preferences_*.jsonl``): the right
answer chosen, a wrong sum in 0..terms*max_operand rejected, for a reward model of the task
(``rlhf-train task=reward_model data.preferences.path=shipped:arithmetic/data/...``).

    python experiments/arithmetic/data/make_data.py                 # writes the shipped files
    python experiments/arithmetic/data/make_data.py --base-rate 128  # SmolLM2's success rate

``--base-rate N`` samples one response per eval prompt (the first N) from SmolLM2-135M-Instruct
as PPO does (temperature 0.7 unless ``--temperature``, no top-k/top-p, one line of at most 8
tokens, seed 0) and prints the share that the reward accepts; it writes nothing.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def addition(rng: random.Random, terms: int, max_operand: int) -> tuple[list[int], int]:
    """``terms`` operands drawn uniformly from 0..max_operand, and their sum."""
    operands = [rng.randint(0, max_operand) for _ in range(terms)]
    return operands, sum(operands)


def question(operands: list[int]) -> str:
    return "Q: " + " + ".join(str(x) for x in operands) + " = ?\nA:"


def make_row(rng: random.Random, shots: int, terms: int, max_operand: int) -> dict:
    """One prompt row: ``prompt`` (``shots`` solved examples, then the question) and ``answer``."""
    lines = []
    for _ in range(shots):
        operands, total = addition(rng, terms, max_operand)
        lines.append(f"{question(operands)} {total}\n")
    operands, total = addition(rng, terms, max_operand)
    return {"prompt": "".join(lines) + question(operands), "answer": total}


def make_splits(
    num_train: int, num_eval: int, shots: int, terms: int, max_operand: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """``num_train`` and ``num_eval`` prompts, all distinct: (train, eval)."""
    rng = random.Random(seed)
    rows: dict[str, dict] = {}
    for _ in range(100 * (num_train + num_eval)):
        row = make_row(rng, shots, terms, max_operand)
        rows.setdefault(row["prompt"], row)
        if len(rows) == num_train + num_eval:
            break
    else:
        raise SystemExit("cannot draw that many distinct prompts; raise --max-operand or --shots")
    ordered = list(rows.values())
    return ordered[num_eval:], ordered[:num_eval]


def make_pairs(rows: list[dict], max_sum: int, seed: int) -> list[dict]:
    """One preference pair per prompt row: ``chosen`` is the right answer, ``rejected`` a wrong
    one drawn uniformly from 0..max_sum, both written as the model continues (`` 7``)."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        wrong = rng.choice([n for n in range(max_sum + 1) if n != row["answer"]])
        pairs.append(
            {"prompt": row["prompt"], "chosen": f" {row['answer']}", "rejected": f" {wrong}"}
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def base_rate(rows: list[dict], temperature: float = 0.7) -> float:
    """Share of SmolLM2 samples (PPO's sampling settings) that the reward accepts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reward import first_number_correct

    from rlhf_lightning.config import GenerationConfig
    from rlhf_lightning.evaluation import generate_texts
    from rlhf_lightning.models import load_causal_lm, load_tokenizer

    lm = load_causal_lm("builtin:smollm2")
    tokenizer = load_tokenizer("builtin:smollm2", padding_side="left")
    gen = GenerationConfig(
        temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=8, stop_token="\n"
    )
    prompts = [row["prompt"] for row in rows]
    responses = generate_texts(lm, tokenizer, prompts, gen, batch_size=32, seed=0)
    scores = first_number_correct(prompts, responses, [row["answer"] for row in rows])
    for prompt, response, score in list(zip(prompts, responses, scores))[:6]:
        print(f"--- {prompt.splitlines()[-2]!r} -> {response!r} ({score:.0f})")
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--num-eval", type=int, default=128)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--terms", type=int, default=2)
    parser.add_argument("--max-operand", type=int, default=5)
    parser.add_argument("--base-rate", type=int, default=0, help="sample N eval prompts, print")
    parser.add_argument("--temperature", type=float, default=0.7, help="of --base-rate sampling")
    args = parser.parse_args()
    train, evals = make_splits(
        args.num_train, args.num_eval, args.shots, args.terms, args.max_operand, args.seed
    )
    if args.base_rate:
        rate = base_rate(evals[: args.base_rate], args.temperature)
        print(f"base success rate on {min(args.base_rate, len(evals))} eval prompts: {rate:.3f}")
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "prompts_train.jsonl", train)
    write_jsonl(args.out_dir / "prompts_eval.jsonl", evals)
    max_sum = args.terms * args.max_operand
    write_jsonl(args.out_dir / "preferences_train.jsonl", make_pairs(train, max_sum, args.seed))
    write_jsonl(args.out_dir / "preferences_eval.jsonl", make_pairs(evals, max_sum, args.seed + 1))
    print(
        f"wrote {len(train)} train and {len(evals)} eval prompts, and a preference pair for "
        f"each, to {args.out_dir}"
    )


if __name__ == "__main__":
    main()
