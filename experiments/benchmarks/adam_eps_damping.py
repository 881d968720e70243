"""How much AdamW's epsilon shrinks the first PPO policy step of SmolLM2, with and without clipping.

Adam's first (bias-corrected) step on a parameter is ``lr * g / (|g| + eps)``: about ``lr`` when
``|g| >> eps`` and ``lr * |g| / eps`` when ``|g| << eps``. Policy-gradient gradients of a 135 M
parameter LM are small per parameter, so ``eps=1e-5`` (the N+ default) damps many of them, and
clipping the global norm to 1.0 first makes every gradient smaller still. This script takes one
policy-gradient gradient at ratio 1 (``-mean(A_t * log pi(y_t))`` over 8 sampled 48-token
responses, with N(0, 1) advantages standing in for whitened ones) and prints the mean of
``|g| / (|g| + eps)`` over the parameters that get a gradient, i.e. the size of the first step in
units of ``lr``.

    python experiments/benchmarks/adam_eps_damping.py --policy builtin:smollm2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = REPO / "experiments" / "sentiment" / "data" / "prompts_train.jsonl"


def step_sizes(abs_grad, eps_values, max_norm=None):
    """Mean ``|g| / (|g| + eps)`` over the entries of ``abs_grad`` (1-D, non-zero), for each eps.

    With ``max_norm``, the gradient is first clipped to that global norm (as ``clip_grad_norm_``
    does: scaled by ``max_norm / norm`` when the norm exceeds it).
    """
    norm = float(abs_grad.pow(2).sum().sqrt())
    if max_norm is not None and norm > max_norm:
        abs_grad = abs_grad * (max_norm / norm)
    return {eps: float((abs_grad / (abs_grad + eps)).mean()) for eps in eps_values}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="builtin:smollm2")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)

    import torch

    from rlhf_lightning.models import load_causal_lm, load_tokenizer
    from rlhf_lightning.ops import logprobs_from_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.policy, padding_side="left")
    lm = load_causal_lm(args.policy)
    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f][: args.batch]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        sequences = lm.generate(
            **batch,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt_len = batch["input_ids"].shape[1]
    mask = torch.cat(
        [batch["attention_mask"], torch.ones(len(prompts), args.new_tokens, dtype=torch.long)], 1
    )
    logits = lm(input_ids=sequences, attention_mask=mask).logits[:, prompt_len - 1 : -1]
    logprobs = logprobs_from_logits(logits, sequences[:, prompt_len:], args.temperature)
    advantages = torch.randn_like(logprobs)
    (-(advantages * logprobs).mean()).backward()

    grads = torch.cat([q.grad.flatten().abs() for q in lm.parameters() if q.grad is not None])
    nonzero = grads[grads > 0]
    eps_values = (1e-5, 1e-8)
    result = {
        "parameters": grads.numel(),
        "with_gradient": nonzero.numel(),
        "grad_norm": float(grads.pow(2).sum().sqrt()),
        "median_abs_grad": float(nonzero.median()),
        "step_over_lr": {str(e): s for e, s in step_sizes(nonzero, eps_values).items()},
        "step_over_lr_clipped_1": {
            str(e): s for e, s in step_sizes(nonzero, eps_values, max_norm=1.0).items()
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
