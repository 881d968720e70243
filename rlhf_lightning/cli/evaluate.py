"""``rlhf-eval``: score a policy against its reference on a prompt set.

Example::

    rlhf-eval outputs/ppo/run/checkpoints/last.ckpt \\
        --prompts shipped:sentiment/data/prompts_eval.jsonl \\
        --reward learned path=outputs/rm/run/reward_model --gold vader --output eval.json

The reference defaults to the checkpoint's base policy (``policy_source``, or ``--base``); for any
other POLICY it must be given with ``--reference`` (``none``: the policy alone). Prints a table of
the metrics of `rlhf_lightning.evaluation.evaluate_policy` (value, standard error over prompts,
and the bootstrap interval of the rewards, gold scores and win rate) and, with ``--output``,
writes them as JSON together with the settings.

``--reward``, ``--gold`` and ``--judge`` name a config of ``conf/reward/`` and overrides of its
keys, as ``rlhf-train reward=<CONFIG> reward.<KEY>=<VALUE>`` would: ``vader``, ``learned
path=DIR``, ``token_fraction target=e``, ``classifier_imdb name_or_path=DIR label=POS``,
``python fn=pkg.module:function``, ``reasoning_gym``.

The held-out prompts of a generated task (a prompt config, e.g. reasoning-gym's) are made by its
data module, exactly as in training; the verifier's score is the accuracy::

    rlhf-eval outputs/ppo/run/policy --reference none --data reasoning_gym eval_size=400 \\
        --reward reasoning_gym --stop-token $'\\n' --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rlhf_lightning.cli.generate import (
    add_generation_args,
    add_model_args,
    generation_config_from,
    model_inputs,
    resolve_device,
)
from rlhf_lightning.data.tokenize import ChatPrompt
from rlhf_lightning.evaluation import (
    CHECKPOINT_SUFFIX,
    checkpoint_policy_source,
    evaluate_policy,
    load_policy_for_inference,
    read_prompt_rows,
)
from rlhf_lightning.rewards import RewardSource, build_reward


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-eval",
        description="Evaluate a policy against a reference policy on a prompt set.",
        epilog="REWARD: CONFIG [KEY=VALUE ...], a config of conf/reward/ (vader, learned, "
        "token_fraction, classifier_imdb, python, reasoning_gym) and overrides of its keys, "
        "e.g. --reward learned path=DIR",
    )
    parser.add_argument("policy", metavar="POLICY", help="exported dir, .ckpt, builtin, hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompts",
        help="jsonl with a 'prompt' field (other fields reach the rewards as columns) or txt; "
        "shipped:... allowed",
    )
    source.add_argument(
        "--data",
        nargs="+",
        metavar="ARG",
        help="CONFIG [KEY=VALUE ...]: the held-out prompts of a prompt config of "
        "conf/data/prompts/ (e.g. reasoning_gym eval_size=400), made as rlhf-train makes them",
    )
    parser.add_argument(
        "--reference",
        help="reference model (default: the base policy of a .ckpt POLICY); 'none': evaluate "
        "the policy alone (no KL, win rate or reference scores)",
    )
    parser.add_argument(
        "--reward", nargs="+", default=["vader"], metavar="ARG", help="REWARD (default: vader)"
    )
    parser.add_argument("--gold", nargs="+", metavar="ARG", help="REWARD reported as gold_score")
    parser.add_argument(
        "--judge", nargs="+", metavar="ARG", help="REWARD judging the win rate (default: --reward)"
    )
    parser.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="level of the win-rate bootstrap interval"
    )
    parser.add_argument(
        "--bootstrap-resamples", type=int, default=1000, help="resamples of the prompts"
    )
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--output", help="write the metrics and settings as JSON here")
    parser.add_argument(
        "--samples", help="write one JSON line per prompt here (texts, rewards, KL, length)"
    )
    add_model_args(parser)
    add_generation_args(parser)
    return parser


NO_REFERENCE = "none"


def default_reference(args: argparse.Namespace) -> str:
    """``--reference``, else the base policy of a checkpoint POLICY."""
    if args.reference:
        return args.reference
    if args.policy.endswith(CHECKPOINT_SUFFIX):
        source = args.base or checkpoint_policy_source(args.policy)
        if source:
            return source
        raise ValueError(
            f"{args.policy} does not name its base policy; pass --reference MODEL or --base MODEL"
        )
    raise ValueError(
        "--reference MODEL is required when POLICY is not a .ckpt (e.g. the base model the "
        "policy was trained from)"
    )


def compose_group(group: str, spec: list[str], flag: str):
    """The config of the config group ``group`` (``data/prompts``, ``reward``) for ``spec =
    [CONFIG, KEY=VALUE, ...]``: a config of conf/<group>/ and overrides of its keys, composed as
    rlhf-train composes it. Raises ValueError, naming ``flag``, for a config or override that
    does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rlhf_lightning.cli.train import CONF_DIR

    key = group.replace("/", ".")
    name, *overrides = spec
    known = sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))
    if name not in known:
        raise ValueError(f"{flag} {' '.join(spec)}: no config {name!r} in conf/{group}/; one of: "
                         f"{', '.join(known)}")  # fmt: skip
    # "key=v", "+key=v", "~key" of the group (the prefix after Hydra's + or ~)
    keyed = [f"{o[: len(o) - len(o.lstrip('+~'))]}{key}.{o.lstrip('+~')}" for o in overrides]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            # task=ppo: the main job's task (pipeline) sets the reward to its own reward model
            cfg = compose("config", ["task=ppo", f"{group}={name}", *keyed])
    except (HydraException, OmegaConfBaseException) as error:
        raise ValueError(f"{flag} {' '.join(spec)}: {str(error).splitlines()[0]}") from None
    return OmegaConf.select(cfg, key)


def compose_prompt_config(spec: list[str]):
    """The ``data.prompts`` config of ``spec = [CONFIG, KEY=VALUE, ...]`` (``--data``)."""
    return compose_group("data/prompts", spec, "--data")


def reward_from_config(spec: list[str], flag: str = "--reward") -> RewardSource:
    """The reward of ``spec = [CONFIG, KEY=VALUE, ...]``: a config of conf/reward/ with its
    overrides, built as rlhf-train builds ``reward``. Raises ValueError naming ``flag`` for a
    config that does not compose, lacks a required key or cannot be built."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_group("reward", spec, flag)
    missing = sorted(key.removeprefix("reward.") for key in OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join(spec)
        raise ValueError(
            f"{flag} {given}: {missing[0]} is required ({flag} {given} {missing[0]}=...)"
        )
    try:
        return build_reward(instantiate(cfg))
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ValueError(f"{flag} {' '.join(spec)}: {cause}") from None


def held_out_prompts(prompt_cfg, tokenizer, chat_template: bool):
    """The held-out prompts of a composed prompt config, tokenised by its data module as in
    training: ``(prompts, columns)``, each prompt a `ChatPrompt` holding the module's ids."""
    from hydra.utils import instantiate

    module = instantiate(prompt_cfg, tokenizer=tokenizer, batch_size=1, chat_template=chat_template)
    module.setup()
    items = module.eval_items
    prompts = [ChatPrompt(item["prompt"], item["input_ids"]) for item in items]
    columns = {name: [item["columns"][name] for item in items] for name in module.column_names}
    return prompts, columns


def run(args: argparse.Namespace) -> dict:
    """Evaluate; returns ``{"metrics": {...}, "settings": {...}, "samples": [a row a prompt]}``."""
    gen = generation_config_from(args, args.policy)
    if args.prompts is not None:
        prompts, columns = read_prompt_rows(args.prompts)
    else:
        prompt_cfg = compose_prompt_config(args.data)
    reward = reward_from_config(args.reward)
    gold = reward_from_config(args.gold, "--gold") if args.gold else None
    judge = reward_from_config(args.judge, "--judge") if args.judge else None
    reference = default_reference(args)

    device = resolve_device(args.device)
    policy_lm, tokenizer = load_policy_for_inference(args.policy, args.base, args.dtype)
    if args.prompts is None:
        prompts, columns = held_out_prompts(prompt_cfg, tokenizer, args.chat_template)
    else:
        prompts = model_inputs(tokenizer, prompts, args.chat_template)
    prompts = prompts[: args.num_prompts]
    columns = {name: values[: args.num_prompts] for name, values in columns.items()}
    if not prompts:
        raise ValueError(f"{args.prompts or ' '.join(args.data)}: no prompts")
    ref_lm = None
    if reference != NO_REFERENCE:
        ref_lm, ref_tokenizer = load_policy_for_inference(reference, dtype=args.dtype)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"the reference {reference!r} uses a different tokenizer from the policy; the "
                "KL needs a reference with the policy's tokenizer"
            )
        ref_lm.to(device)
    policy_lm.to(device)
    samples: list[dict] = []
    metrics = evaluate_policy(
        policy_lm,
        ref_lm,
        tokenizer,
        prompts,
        reward,
        gold=gold,
        judge=judge,
        gen=gen,
        batch_size=args.batch_size,
        seed=args.seed,
        samples=samples,
        columns=columns,
        confidence=args.confidence,
        num_resamples=args.bootstrap_resamples,
        bootstrap_seed=args.bootstrap_seed,
    )
    settings = {key: value for key, value in vars(args).items() if key not in ("output", "samples")}
    settings["reference"] = reference
    return {"metrics": metrics, "settings": settings, "samples": samples}


STD_ERROR_SUFFIX = "_std_error"
CI_SUFFIXES = ("_ci_low", "_ci_high")


def format_table(metrics: dict, confidence: float = 0.95) -> str:
    """One row per metric: its value, its standard error and its interval where it has them.

    ``<key>_std_error``, ``<key>_ci_low`` and ``<key>_ci_high`` fill the columns of ``<key>``.
    """
    folded = (STD_ERROR_SUFFIX, *CI_SUFFIXES)
    keys = [key for key in metrics if not key.endswith(folded)]
    width = max(len(key) for key in keys)
    ci_header = f"{confidence:.0%} CI (bootstrap)"
    lines = [f"{'metric':<{width}}  {'value':>10}  {'std error':>10}  {ci_header}"]
    for key in keys:
        value = metrics[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        se = metrics.get(key + STD_ERROR_SUFFIX)
        se_text = "" if se is None else f"{se:.4f}"
        row = f"{key:<{width}}  {text:>10}  {se_text:>10}"
        low, high = (metrics.get(key + suffix) for suffix in CI_SUFFIXES)
        if low is not None and high is not None:
            row += f"  [{low:.4f}, {high:.4f}]"
        lines.append(row.rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.bootstrap_resamples < 1:
        parser.error(f"--bootstrap-resamples must be >= 1, got {args.bootstrap_resamples}")
    try:
        result = run(args)
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(format_table(result["metrics"], args.confidence))
    samples = result.pop("samples")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if args.samples:
        out = Path(args.samples)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in samples), encoding="utf-8")
        print(f"wrote {out} ({len(samples)} rows)")


if __name__ == "__main__":
    main()
