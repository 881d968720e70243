"""How much of the VADER labels a word-count model learns from the shipped preference pairs.

    python experiments/sentiment/bow_baseline.py [--train FILE] [--eval FILE]

A Bradley-Terry model whose reward is a weighted count of the response's words,
``r(y) = sum_w weight_w * count_w(y)``, fitted on the training pairs (L2 penalty, L-BFGS) and
scored on the held-out pairs. VADER itself is close to such a model (a sum of word valences,
plus rules for negation, intensifiers, "but" and punctuation), so its held-out accuracy says
what the training pairs teach about the labeller without any prior knowledge of language:
with every word as a feature, and with only the words of VADER's lexicon (the labeller's
vocabulary, given for free). A last row uses VADER's own valences as the weights, unfitted: the
share of labels that the plain sum of word valences explains, without VADER's rules. Prints one
markdown row per (features, penalty). Seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

DATA = Path(__file__).resolve().parent / "data"
PENALTIES = (1e-5, 1e-4, 1e-3)


def tokens(text: str) -> list[str]:
    """Lowercased whitespace tokens, punctuation around them stripped, empty ones dropped."""
    return [w for w in (t.strip(string.punctuation) for t in text.lower().split()) if w]


def count_matrix(texts: list[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """(N, V) float64 word counts; words outside ``vocabulary`` are ignored."""
    counts = torch.zeros(len(texts), len(vocabulary), dtype=torch.float64)
    for row, text in enumerate(texts):
        for word in tokens(text):
            column = vocabulary.get(word)
            if column is not None:
                counts[row, column] += 1
    return counts


def fit_weights(differences: torch.Tensor, penalty: float, max_iter: int = 500) -> torch.Tensor:
    """Minimise ``mean(-log sigmoid(D w)) + penalty * |w|^2`` over w: (N, V) -> (V,)."""
    weights = torch.zeros(differences.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = differences @ weights
        loss = -torch.nn.functional.logsigmoid(logits).mean() + penalty * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def evaluate(train: list[dict], held_out: list[dict], lexicon_only: bool, penalty: float) -> dict:
    """Train and held-out accuracy (share of pairs with r(chosen) > r(rejected))."""
    lexicon = SentimentIntensityAnalyzer().lexicon
    words = dict.fromkeys(
        w for pair in train for key in ("chosen", "rejected") for w in tokens(pair[key])
    )
    if lexicon_only:
        words = {w: None for w in words if w in lexicon}
    vocabulary = {w: i for i, w in enumerate(words)}

    def differences(pairs: list[dict]) -> torch.Tensor:
        chosen = count_matrix([p["chosen"] for p in pairs], vocabulary)
        return chosen - count_matrix([p["rejected"] for p in pairs], vocabulary)

    weights = fit_weights(differences(train), penalty)
    return {
        "features": "VADER-lexicon words" if lexicon_only else "all words",
        "vocabulary": len(vocabulary),
        "penalty": penalty,
        "train_accuracy": ((differences(train) @ weights) > 0).double().mean().item(),
        "eval_accuracy": ((differences(held_out) @ weights) > 0).double().mean().item(),
    }


def valence_sum_accuracy(pairs: list[dict]) -> float:
    """Share of pairs whose chosen response has the larger sum of VADER lexicon valences."""
    lexicon = SentimentIntensityAnalyzer().lexicon

    def total(text: str) -> float:
        return sum(lexicon.get(w, 0.0) for w in tokens(text))

    return sum(total(p["chosen"]) > total(p["rejected"]) for p in pairs) / len(pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DATA / "preferences_train.jsonl")
    parser.add_argument("--eval", type=Path, default=DATA / "preferences_eval.jsonl")
    args = parser.parse_args(argv)
    train, held_out = read_pairs(args.train), read_pairs(args.eval)
    print(f"{len(train)} train pairs, {len(held_out)} held-out pairs\n")
    print("| features | words | L2 penalty | train accuracy | held-out accuracy |")
    print("|---|---|---|---|---|")
    for lexicon_only in (False, True):
        for penalty in PENALTIES:
            r = evaluate(train, held_out, lexicon_only, penalty)
            print(
                f"| {r['features']} | {r['vocabulary']} | {r['penalty']:g} "
                f"| {r['train_accuracy']:.3f} | {r['eval_accuracy']:.3f} |"
            )
    print(
        f"| VADER valences, summed, not fitted | {len(SentimentIntensityAnalyzer().lexicon)} | - "
        f"| {valence_sum_accuracy(train):.3f} | {valence_sum_accuracy(held_out):.3f} |"
    )


if __name__ == "__main__":
    main()
