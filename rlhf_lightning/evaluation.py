"""Evaluate a policy: sample from it, score the samples, measure its drift from the reference.

`evaluate_policy` samples one response per prompt from the policy and one from the reference
(same seed), then reports:

- ``reward`` / ``gold_score``: mean score of the policy's responses under the reward (and gold)
  source, and ``reference_reward`` / ``reference_gold_score``: the same for the reference's
  responses;
- ``kl``: mean over prompts of ``sum_t log pi(y_t | .) - log pi_ref(y_t | .)`` over the policy's
  own responses (the k1 estimator of KL(pi || pi_ref) per sequence), with both models' logits
  divided by the sampling temperature, as in PPO's KL penalty. With ``top_k``/``top_p`` the
  samples come from the truncated distribution while the logprobs use the full one (also as in
  PPO), so the estimate is then only approximate;
- ``response_length`` (tokens, the stop token included), ``ended_frac`` (share of responses that
  emitted the stop token), ``distinct_1`` / ``distinct_2`` (diversity);
- ``win_rate``: how often the judge (default: the reward) scores the policy's response above the
  reference's response to the same prompt, ties counting 0.5.

Every metric that is a mean over prompts (all but ``distinct_*`` and ``num_prompts``) comes with
its standard error over prompts, ``<metric>_std_error`` (sample std / sqrt(n), 0 for a single
prompt): the noise to beat when two policies are compared on the same prompts. The rewards, the
gold scores and the win rate also get a percentile bootstrap interval over prompts
(``<metric>_ci_low``, ``<metric>_ci_high``; 95% and 1000 seeded resamples unless told
otherwise). With a verifier as the reward (``reasoning_gym``), ``reward`` is the held-out
accuracy and its interval the accuracy's.

Sampling is seeded with `torch.random.fork_rng`, so it is deterministic for a seed and leaves the
global RNG untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.data.loading import resolve_data_path
from rlhf_lightning.data.padding import pad_token_ids, require_pad_token_id
from rlhf_lightning.data.tokenize import encode_prompts
from rlhf_lightning.kl import sequence_kl
from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.models.adapters import inject_lora, merged_copy
from rlhf_lightning.rewards import RewardSource
from rlhf_lightning.rollout.experience import response_logprobs
from rlhf_lightning.rollout.generation import Rollout, resolve_stop_token_ids, sample_responses

CHECKPOINT_SUFFIX = ".ckpt"
# Metrics that get a bootstrap interval over prompts besides their standard error.
INTERVAL_METRICS = ("reward", "reference_reward", "gold_score", "reference_gold_score", "win_rate")
POLICY_LM_PREFIX = "policy.lm."


# ----------------------------------------------------------------------------------- loading
def _load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise ValueError(f"{path}: cannot read it as a torch checkpoint: {error}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict' dict)")
    return checkpoint


def checkpoint_policy_source(path: str | os.PathLike) -> str | None:
    """The ``name_or_path`` of the base policy stored in a PPO checkpoint, or None."""
    state = _load_checkpoint(Path(path)).get("rlhf_lightning")
    return state.get("policy_source") if isinstance(state, dict) else None


def load_policy_for_inference(
    path_or_name: str | os.PathLike, base: str | None = None, dtype: str = "float32"
):
    """Load a policy LM and its left-padding tokenizer, in eval mode.

    ``path_or_name``: anything `load_causal_lm` takes (an exported PPO policy dir, a builtin, a
    .gguf file, a hub id), or a PPO checkpoint ``*.ckpt``. For a checkpoint, the base model named
    by ``base`` (else by the checkpoint's ``policy_source``) is loaded and its weights replaced by
    the checkpoint's ``policy.lm.*`` weights. Returns ``(lm, tokenizer)``.
    """
    name = os.fspath(path_or_name)
    if not name.endswith(CHECKPOINT_SUFFIX):
        if base is not None:
            raise ValueError(f"base={base!r} only applies to a .ckpt checkpoint, not to {name!r}")
        return load_causal_lm(name, dtype=dtype), load_tokenizer(name, padding_side="left")

    path = Path(name).expanduser()
    checkpoint = _load_checkpoint(path)
    lm_state = {
        key.removeprefix(POLICY_LM_PREFIX): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(POLICY_LM_PREFIX)
    }
    if not lm_state:
        raise ValueError(
            f"{path}: no policy weights (state_dict keys '{POLICY_LM_PREFIX}*'); "
            "is it a PPO checkpoint?"
        )
    state = checkpoint.get("rlhf_lightning")
    source = base or (state.get("policy_source") if isinstance(state, dict) else None)
    if not source:
        raise ValueError(
            f"{path}: the checkpoint does not name its base policy (policy_source); "
            "pass the base model (--base MODEL)"
        )
    try:
        lm = load_causal_lm(source, dtype=dtype)
        tokenizer = load_tokenizer(source, padding_side="left")
    except OSError as error:
        raise type(error)(
            f"{path}: cannot load its base policy {source!r}: {error} "
            "(pass another base model with --base MODEL)"
        ) from error
    lora = state.get("policy_lora") if isinstance(state, dict) else None
    if lora:  # a LoRA run: the same adapters, loaded, then merged into a plain model
        lm = inject_lora(lm, **lora)
    _load_lm_weights(lm, lm_state, path, source)
    if lora:
        lm = merged_copy(lm)
    return lm.eval(), tokenizer


def _load_lm_weights(lm, lm_state: dict, path: Path, source: str) -> None:
    """Copy ``lm_state`` into ``lm``; keys missing from it must be tied to loaded ones."""
    try:
        missing, unexpected = lm.load_state_dict(lm_state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(
            f"{path}: its weights do not fit the base model {source!r}: {error}"
        ) from None
    own = lm.state_dict()
    loaded = {own[key].data_ptr() for key in lm_state if key in own}
    missing = [key for key in missing if own[key].data_ptr() not in loaded]  # tied weights
    if missing or unexpected:
        raise ValueError(
            f"{path}: its weights do not match the base model {source!r}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def read_prompt_rows(path: str) -> tuple[list[str], dict[str, list]]:
    """Prompts and the other columns of a prompt file: ``(prompts, {column: one value a prompt})``.

    A ``.jsonl`` file holds an object with a string ``prompt`` field per line; its other fields
    with scalar values (strings, numbers, booleans, null) are the columns, None where a row lacks
    one (a reward receives the columns its signature names, e.g. ``answer``). Any other file holds
    one prompt per non-empty line and no columns. ``shipped:...`` names a file in the
    repository's ``experiments/``.
    """
    file = Path(resolve_data_path(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts file not found: {file}")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix != ".jsonl":
        return [line for line in lines if line.strip()], {}
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{number}: invalid JSON: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{file}:{number}: expected an object with a string 'prompt' field")
        rows.append(row)
    names = dict.fromkeys(
        name
        for row in rows
        for name, value in row.items()
        if name != "prompt" and isinstance(value, str | int | float | bool | type(None))
    )
    columns = {name: [row.get(name) for row in rows] for name in names}
    return [row["prompt"] for row in rows], columns


def read_prompts(path: str) -> list[str]:
    """The prompts of `read_prompt_rows` (a ``.jsonl`` file's ``prompt`` fields, or the non-empty
    lines of a text file)."""
    return read_prompt_rows(path)[0]


# -------------------------------------------------------------------------------- generation
def _device(model) -> torch.device:
    return next(model.parameters()).device


def sample_rollouts(
    lm, tokenizer, prompts: Sequence[str], gen: GenerationConfig, batch_size: int = 16, seed=0
) -> list[Rollout]:
    """Sample one response per prompt in batches of ``batch_size`` left-padded prompts.

    Prompts are tokenised as the PPO prompt data is (`rlhf_lightning.data.tokenize.
    encode_prompts`): with the special tokens the tokenizer adds, special-token text in them as
    text; a `ChatPrompt` (a chat-template rendering) brings its own token ids. The RNG is seeded
    with ``seed`` once, inside `torch.random.fork_rng`. Returns one `Rollout` per batch, its
    tensors on ``lm``'s device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to generate from")
    encoded = encode_prompts(tokenizer, prompts)
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts at positions {empty[:10]} are empty (no tokens)")
    pad_id = require_pad_token_id(tokenizer)
    stop_token_ids = resolve_stop_token_ids(tokenizer, gen.stop_token)
    device = _device(lm)
    lm.eval()
    rollouts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            query_ids, query_mask = pad_token_ids(
                encoded[start : start + batch_size], pad_id, "left"
            )
            rollouts.append(
                sample_responses(
                    lm,
                    tokenizer,
                    query_ids.to(device),
                    query_mask.to(device),
                    list(prompts[start : start + batch_size]),
                    gen,
                    stop_token_ids,
                )
            )
    return rollouts


def generate_texts(
    lm, tokenizer, prompts: Sequence[str], gen: GenerationConfig, batch_size: int = 16, seed=0
) -> list[str]:
    """One sampled response per prompt (without the stop token); deterministic for a seed."""
    rollouts = sample_rollouts(lm, tokenizer, prompts, gen, batch_size, seed)
    return [text for rollout in rollouts for text in rollout.responses]


# ----------------------------------------------------------------------------------- metrics
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams, over the whitespace tokens of each text (n-grams do not
    cross texts). 0.0 when there are no n-grams."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ngrams = []
    for text in texts:
        words = text.split()
        ngrams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def std_error(scores: torch.Tensor) -> float:
    """Standard error of the mean of (n,) scores: sample std (n - 1) / sqrt(n); 0 when n == 1."""
    n = scores.numel()
    if n < 2:
        return 0.0
    return (scores.double().std(unbiased=True) / n**0.5).item()


def wins(scores_a, scores_b) -> torch.Tensor:
    """Per-pair outcome of a against b: 1 if ``scores_a[i] > scores_b[i]``, 0.5 on a tie, else 0.

    (N,), (N,) -> (N,) float64.
    """
    a = torch.as_tensor(scores_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(scores_b, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"win_rate needs two non-empty score lists of equal length, got {a.numel()} and "
            f"{b.numel()}"
        )
    return (a > b).double() + 0.5 * (a == b).double()


def win_rate(scores_a, scores_b) -> float:
    """Share of pairs with ``scores_a[i] > scores_b[i]``, ties counting 0.5: (N,), (N,) -> float."""
    return float(wins(scores_a, scores_b).mean())


def bootstrap_ci(
    values,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of (n,) per-prompt values.

    Draws ``num_resamples`` resamples of the n values with replacement (a seeded
    ``torch.Generator``, so the interval is a function of the arguments and the global RNG is
    untouched), takes each resample's mean and returns the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of those means (linear interpolation) as ``(low, high)``.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, x.numel(), (num_resamples, x.numel()), generator=generator)
    means = x[index].mean(dim=1)  # (num_resamples,)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return low.item(), high.item()


def policy_reference_kl(policy_lm, ref_lm, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(B,) k1 KL(policy || ref) of each of the policy's own samples in ``rollout``, on the CPU."""
    return sequence_kl(
        response_logprobs(policy_lm, rollout, temperature),
        response_logprobs(ref_lm, rollout, temperature),
        rollout.response_mask.cpu(),
    )


def evaluate_policy(
    policy_lm,
    ref_lm,
    tokenizer,
    prompts: Sequence[str],
    reward: RewardSource,
    gold: RewardSource | None = None,
    judge: RewardSource | None = None,
    gen: GenerationConfig | None = None,
    batch_size: int = 16,
    seed: int = 0,
    samples: list[dict] | None = None,
    columns: dict[str, Sequence] | None = None,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, float]:
    """Metrics of ``policy_lm`` on ``prompts`` against the reference ``ref_lm`` (same tokenizer).

    Keys: ``reward``, ``reference_reward``, ``gold_score`` and ``reference_gold_score`` (with
    ``gold``), ``kl``, ``response_length``, ``ended_frac`` and ``win_rate`` (policy vs reference
    samples under ``judge``, default ``reward``), each with ``<key>_std_error``; an interval
    ``<key>_ci_low``, ``<key>_ci_high`` for each of ``INTERVAL_METRICS`` (`bootstrap_ci` with
    ``confidence``, ``num_resamples``, ``bootstrap_seed``); ``distinct_1``, ``distinct_2``,
    ``num_prompts``. ``ref_lm=None`` evaluates the policy alone: no ``reference_*``, ``kl`` or
    ``win_rate``. See the module docstring for their definitions. ``seed`` seeds the sampling.
    ``columns``: the prompts' other columns (one value a prompt), given to ``reward``, ``gold``
    and ``judge`` as keyword arguments as far as each accepts them. With a ``samples`` list, one
    row per prompt is appended to it: ``prompt``, ``response``, ``reference_response``,
    ``reward``, ``reference_reward``, ``kl``, ``response_length``, ``win`` (1, 0.5 or 0) (and
    ``gold_score`` and ``reference_gold_score`` with ``gold``; without a reference, none of
    its columns).
    """
    gen = gen or GenerationConfig()
    prompts = list(prompts)
    columns = dict(columns or {})
    rollouts = sample_rollouts(policy_lm, tokenizer, prompts, gen, batch_size, seed)
    responses = [text for r in rollouts for text in r.responses]
    scores = reward(prompts, responses, **columns)
    per_prompt = {"reward": scores}  # (N,) each, in the order of the metrics
    if ref_lm is not None:
        ref_rollouts = sample_rollouts(ref_lm, tokenizer, prompts, gen, batch_size, seed)
        ref_responses = [text for r in ref_rollouts for text in r.responses]
        ref_scores = reward(prompts, ref_responses, **columns)
        if judge is None:
            judged, ref_judged = scores, ref_scores
        else:
            judged = judge(prompts, responses, **columns)
            ref_judged = judge(prompts, ref_responses, **columns)
        per_prompt["reference_reward"] = ref_scores
        per_prompt["kl"] = torch.cat(
            [policy_reference_kl(policy_lm, ref_lm, r, gen.temperature) for r in rollouts]
        )
    per_prompt["response_length"] = torch.cat(
        [r.response_mask.sum(dim=1).cpu().float() for r in rollouts]
    )
    per_prompt["ended_frac"] = torch.cat([r.ended.cpu().float() for r in rollouts])
    if ref_lm is not None:
        per_prompt["win_rate"] = wins(judged, ref_judged)
    if gold is not None:
        per_prompt["gold_score"] = gold(prompts, responses, **columns)
        if ref_lm is not None:
            per_prompt["reference_gold_score"] = gold(prompts, ref_responses, **columns)
    metrics = {}
    for key, values in per_prompt.items():
        metrics[key] = values.double().mean().item()
        metrics[f"{key}_std_error"] = std_error(values)
    for key in INTERVAL_METRICS:
        if key in per_prompt:
            low, high = bootstrap_ci(per_prompt[key], confidence, num_resamples, bootstrap_seed)
            metrics.update({f"{key}_ci_low": low, f"{key}_ci_high": high})
    metrics.update(
        distinct_1=distinct_n(responses, 1),
        distinct_2=distinct_n(responses, 2),
        num_prompts=len(prompts),
    )
    if samples is not None:
        rows = {"prompt": prompts, "response": responses}
        if ref_lm is not None:
            rows["reference_response"] = ref_responses
        names = {"win_rate": "win"}
        for key, values in per_prompt.items():
            values = values.int() if key == "response_length" else values
            if key != "ended_frac":
                rows[names.get(key, key)] = values.tolist()
        samples.extend(dict(zip(rows, row)) for row in zip(*rows.values()))
    return metrics
