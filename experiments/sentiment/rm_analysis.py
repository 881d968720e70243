"""Where a trained sentiment reward model errs on held-out pairs, and how calibrated it is.

    python experiments/sentiment/rm_analysis.py outputs/reward_model/<run> [--out DIR]

RUN is the run dir of `rlhf-train task=reward_model` (or of the pipeline): it holds
``reward_model/`` (the export) and ``.hydra/config.yaml``, whose ``data.preferences`` settings
rebuild the pairs exactly as training and validation saw them (same files, joiner, tokenizer,
truncation). Each pair is scored by the exported model (raw rewards, before normalisation), and
VADER, the labeller, is re-run on the texts for the diagnostics. Prints markdown tables:

- accuracy by VADER gap (chosen score - rejected score, the label's own margin);
- accuracy on the pairs with a property that could explain an error: a label that VADER flips
  when it scores the text the reward model sees (prompt + joiner + response) instead of the
  response alone, a label that depends on letter case (VADER's capitalisation boost), a text cut
  by ``max_length``, a word of VADER's lexicon that no training response contains, a label that
  the plain sum of VADER's word valences gets wrong (so VADER's rules for negation, "but",
  intensifiers and punctuation decide it), the chosen response longer than the rejected one;
- the expected calibration error of ``sigmoid(r_w - r_l)`` and its reliability table.

Writes ``reliability.png`` and ``pairs.jsonl`` (one row per pair: texts, VADER scores, reward
margin, correct) into ``--out`` (default ``RUN/rm_analysis``). ``--split train`` analyses the
training pairs instead (how well the model fits what it saw).
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402

from rlhf_lightning.calibration import (  # noqa: E402
    calibration_bins,
    expected_calibration_error,
    reliability_table,
)
from rlhf_lightning.data.preferences import RewardTextFormat  # noqa: E402
from rlhf_lightning.models import ScalarRewardModel, load_reward_tokenizer  # noqa: E402

GAP_EDGES = (0.1, 0.2, 0.3, 0.5, 0.8, 2.0)  # make_data.py drops gaps under 0.1


def tokens(text: str) -> list[str]:
    """Lowercased whitespace tokens with the punctuation around them stripped (as VADER reads
    words), empty ones dropped."""
    return [w for w in (t.strip(string.punctuation) for t in text.lower().split()) if w]


def words(text: str) -> set[str]:
    """The distinct `tokens` of ``text``."""
    return set(tokens(text))


def valence_sum(lexicon: dict[str, float], text: str) -> float:
    """Sum of the VADER lexicon valences of the text's tokens: VADER without its rules."""
    return sum(lexicon.get(w, 0.0) for w in tokens(text))


def vader_gap(scorer: SentimentIntensityAnalyzer, first: str, second: str) -> float:
    """VADER compound score of ``first`` minus that of ``second``."""
    return scorer.polarity_scores(first)["compound"] - scorer.polarity_scores(second)["compound"]


def pair_features(
    scorer: SentimentIntensityAnalyzer,
    item: dict,
    text_format: RewardTextFormat,
    seen_words: set[str] = frozenset(),
) -> dict:
    """Diagnostics of one tokenised pair (``prompt``, ``chosen``, ``rejected``, ``*_ids``).

    ``gap``: VADER(chosen) - VADER(rejected), as labelled; ``flips_in_context``: VADER prefers
    the rejected response (or ties) once each response is scored with its prompt, as the reward
    model reads it (``text_format.text``); ``flips_lowercased``: the same for lowercased
    responses (an uncased tokenizer cannot see case); ``truncated``: a text reached
    ``text_format.max_length`` tokens; ``new_lexicon_word``:
    a response holds a word of VADER's lexicon that is not in ``seen_words`` (the words of the
    training responses); ``rule_decided``: the plain sum of lexicon valences does not prefer the
    chosen response; ``chosen_longer``: more characters in the chosen response.
    """
    chosen, rejected, prompt = item["chosen"], item["rejected"], item["prompt"]
    return {
        "gap": vader_gap(scorer, chosen, rejected),
        "flips_in_context": vader_gap(
            scorer, text_format.text(prompt, chosen), text_format.text(prompt, rejected)
        )
        <= 0,
        "flips_lowercased": vader_gap(scorer, chosen.lower(), rejected.lower()) <= 0,
        "truncated": max(len(item["chosen_ids"]), len(item["rejected_ids"]))
        >= text_format.max_length,
        "new_lexicon_word": any(
            w in scorer.lexicon and w not in seen_words for w in words(chosen) | words(rejected)
        ),
        "rule_decided": valence_sum(scorer.lexicon, chosen)
        <= valence_sum(scorer.lexicon, rejected),
        "chosen_longer": len(chosen) > len(rejected),
    }


def accuracy_by_bins(
    values: list[float], correct: list[bool], edges: tuple[float, ...]
) -> list[dict]:
    """Rows ``low``, ``high``, ``count``, ``accuracy`` of the pairs with ``low <= value < high``
    (the last bin includes ``high``); empty bins are left out."""
    rows = []
    for k, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = k == len(edges) - 2
        hits = [c for v, c in zip(values, correct) if low <= v < high or (last and v == high)]
        if hits:
            rows.append(
                {"low": low, "high": high, "count": len(hits), "accuracy": sum(hits) / len(hits)}
            )
    return rows


def load_run(run_dir: Path):
    """The run's exported reward model, its tokenizer and the preference data module (set up)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    model_dir = run_dir / "reward_model"
    if not config_file.is_file() or not model_dir.is_dir():
        raise SystemExit(f"{run_dir}: expected .hydra/config.yaml and reward_model/ (a run dir)")
    cfg = OmegaConf.load(config_file)
    tokenizer = load_reward_tokenizer(model_dir)
    datamodule = instantiate(cfg.data.preferences, tokenizer=tokenizer)
    datamodule.setup("fit")
    return ScalarRewardModel.from_pretrained(model_dir).eval(), datamodule


@torch.no_grad()
def reward_margins(model, datamodule, split: str) -> torch.Tensor:
    """(N,) raw r_w - r_l of every pair of the split, in the order of its items."""
    loader = (
        datamodule.val_dataloader()
        if split == "eval"
        else datamodule._loader(datamodule.train_items, datamodule.eval_batch_size, None)
    )
    margins = []
    for batch in loader:
        chosen, rejected = model(batch["input_ids"], batch["attention_mask"]).chunk(2)
        margins.append(chosen - rejected)
    return torch.cat(margins)


def plot_reliability(rows: list[dict], ece: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0.5, 1], [0.5, 1], color="gray", linestyle="--", label="calibrated")
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    width = rows[0]["high"] - rows[0]["low"] if rows else 0.05
    ax.bar(centers, [r["accuracy"] for r in rows], width=width * 0.9, alpha=0.6, label="accuracy")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", color="C1")
    for center, r in zip(centers, rows):
        ax.annotate(str(r["count"]), (center, 0.42), ha="center", fontsize=7)
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("confidence max(p, 1 - p), p = sigmoid(r_w - r_l)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reward model reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [fmt.format(**row) for _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def analyse(run_dir: Path, split: str, out: Path) -> dict:
    """Score, diagnose, write ``pairs.jsonl`` and ``reliability.png``; returns the summary."""
    model, datamodule = load_run(run_dir)
    items = datamodule.eval_items if split == "eval" else datamodule.train_items
    margins = reward_margins(model, datamodule, split)
    scorer = SentimentIntensityAnalyzer()
    seen_words = set().union(*(words(response) for _, response in datamodule.train_texts()))
    pairs = []
    for item, margin in zip(items, margins.tolist(), strict=True):
        features = pair_features(scorer, item, datamodule.text_format, seen_words)
        pairs.append(
            {
                "prompt": item["prompt"],
                "chosen": item["chosen"],
                "rejected": item["rejected"],
                **features,
                "margin": margin,
                "correct": margin > 0,
            }
        )
    correct = [p["correct"] for p in pairs]
    bins = calibration_bins(margins)
    ece = expected_calibration_error(bins)
    summary = {
        "split": split,
        "pairs": len(pairs),
        "accuracy": sum(correct) / len(pairs),
        "ece": ece,
        "by_gap": accuracy_by_bins([p["gap"] for p in pairs], correct, GAP_EDGES),
        "by_feature": [],
        "reliability": reliability_table(bins),
    }
    properties = (
        "flips_in_context",
        "flips_lowercased",
        "truncated",
        "new_lexicon_word",
        "rule_decided",
        "chosen_longer",
    )
    for name in properties:
        for value in (True, False):
            hits = [p["correct"] for p in pairs if p[name] == value]
            if hits:
                summary["by_feature"].append(
                    {
                        "feature": name,
                        "value": value,
                        "count": len(hits),
                        "accuracy": sum(hits) / len(hits),
                    }
                )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    plot_reliability(summary["reliability"], ece, out / "reliability.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/rm_analysis")
    args = parser.parse_args(argv)
    out = args.run_dir / "rm_analysis" if args.out is None else args.out
    summary = analyse(args.run_dir, args.split, out)
    print(
        f"{summary['split']}: {summary['pairs']} pairs, accuracy {summary['accuracy']:.4f}, "
        f"ECE {summary['ece']:.4f}\n"
    )
    print(
        markdown(
            summary["by_gap"],
            [
                ("VADER gap", "[{low:.1f}, {high:.1f})"),
                ("pairs", "{count}"),
                ("accuracy", "{accuracy:.3f}"),
            ],
        )
        + "\n"
    )
    print(
        markdown(
            summary["by_feature"],
            [
                ("property", "{feature}"),
                ("value", "{value}"),
                ("pairs", "{count}"),
                ("accuracy", "{accuracy:.3f}"),
            ],
        )
        + "\n"
    )
    print(
        markdown(
            summary["reliability"],
            [
                ("confidence bin", "[{low:.2f}, {high:.2f})"),
                ("pairs", "{count}"),
                ("mean confidence", "{confidence:.3f}"),
                ("accuracy", "{accuracy:.3f}"),
            ],
        )
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}/pairs.jsonl, reliability.png, summary.json")


if __name__ == "__main__":
    main()
