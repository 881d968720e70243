"""``rlhf-generate``: sample completions from a policy (exported dir, checkpoint, builtin, hub id).

Examples::

    rlhf-generate outputs/ppo/run/policy "The film was" "The plot"
    rlhf-generate outputs/ppo/run/checkpoints/last.ckpt --prompts-file prompts.jsonl \\
        --num-samples 4 --temperature 0.7 --output samples.jsonl

Without ``--output`` each prompt is printed with its completions; with it, one JSON row
``{"prompt", "response"}`` per completion is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.data.tokenize import has_chat_template, render_chat
from rlhf_lightning.evaluation import generate_texts, load_policy_for_inference, read_prompts
from rlhf_lightning.rollout.generation import load_sampling_settings

DEFAULTS = GenerationConfig()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by rlhf-generate and rlhf-eval: base model, dtype, device, seed, batch."""
    parser.add_argument("--base", help="base model of a .ckpt without a stored policy_source")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each prompt as a user message with the tokenizer's chat template",
    )


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Sampling options. Unset ones come from the model's own sampling settings (a policy
    exported by ``rlhf-train`` stores those it was trained with), else from `GenerationConfig`."""
    group = parser.add_argument_group(
        "generation (default: as the exported policy was trained, else the values shown)"
    )
    group.add_argument("--temperature", type=float, help=f"[{DEFAULTS.temperature}]")
    group.add_argument("--top-k", type=int, help=f"0: off [{DEFAULTS.top_k}]")
    group.add_argument("--top-p", type=float, help=f"1.0: off [{DEFAULTS.top_p}]")
    group.add_argument("--max-new-tokens", type=int, help=f"[{DEFAULTS.max_new_tokens}]")
    group.add_argument("--min-new-tokens", type=int, help=f"[{DEFAULTS.min_new_tokens}]")
    group.add_argument(
        "--stop-token",
        help=f"'eos', 'none' (never stop early) or a string of exactly one token "
        f"[{DEFAULTS.stop_token}]",
    )


def generation_config_from(args: argparse.Namespace, model: str | None = None) -> GenerationConfig:
    """The `GenerationConfig` of the parsed generation options (raises ConfigError): each option
    given on the command line, else the sampling settings stored with ``model`` (an exported
    policy directory), else `GenerationConfig`'s default."""
    stored = load_sampling_settings(model) if model and Path(model).is_dir() else {}
    given = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
    }
    settings = {**stored, **{k: v for k, v in given.items() if v is not None}}
    if args.stop_token is not None:
        settings["stop_token"] = None if args.stop_token.lower() == "none" else args.stop_token
    return GenerationConfig(**settings)


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def model_inputs(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    """The texts fed to the model: the prompts, or each rendered as a user turn with the chat
    template (a `ChatPrompt`: its text, and token ids in which only the template's tokens are
    special)."""
    if not chat_template:
        return prompts
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; leave out --chat-template"
        )
    return [render_chat(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-generate",
        description="Sample completions from a policy.",
        epilog="MODEL: an exported policy dir, a PPO .ckpt, builtin:tiny, a .gguf or a hub id.",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("prompts", metavar="PROMPT", nargs="*", help="prompts to complete")
    parser.add_argument(
        "--prompts-file", help="jsonl with a 'prompt' field, or text with one prompt per line"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--output", help="write jsonl rows {prompt, response} here")
    add_model_args(parser)
    add_generation_args(parser)
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    """Generate the completions; returns the rows ``{"prompt", "response"}``, prompt-major."""
    prompts = list(args.prompts) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    gen = generation_config_from(args, args.model)
    lm, tokenizer = load_policy_for_inference(args.model, base=args.base, dtype=args.dtype)
    lm.to(resolve_device(args.device))
    repeated = [prompt for prompt in prompts for _ in range(args.num_samples)]
    inputs = model_inputs(tokenizer, repeated, args.chat_template)
    responses = generate_texts(lm, tokenizer, inputs, gen, args.batch_size, args.seed)
    return [{"prompt": p, "response": r} for p, r in zip(repeated, responses)]


def write_jsonl(rows: list[dict], path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def print_rows(rows: list[dict], num_samples: int) -> None:
    for start in range(0, len(rows), num_samples):
        print(f"=== {rows[start]['prompt']}")
        for k, row in enumerate(rows[start : start + num_samples], start=1):
            print(f"--- [{k}] {row['response']}")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompts and not args.prompts_file:
        parser.error("no prompt: give PROMPT arguments or --prompts-file FILE")
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    try:
        rows = run(args)
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.output:
        write_jsonl(rows, args.output)
        print(f"wrote {len(rows)} completions to {args.output}", file=sys.stderr)
    else:
        print_rows(rows, args.num_samples)


if __name__ == "__main__":
    main()
