"""Write the training and held-out prompts of a prompt config as JSONL, for another framework.

Runs in rlhf_lightning's environment: the config is composed as ``rlhf-train`` composes
``data/prompts=<CONFIG>``, its data module builds the prompts with the policy's tokenizer, and
each row is written as ``{"prompt": <text>, <column>: <value>, ...}`` (the columns the reward
reads, e.g. ``answer`` and ``reasoning_gym``). ``trl_grpo.py`` trains TRL's ``GRPOTrainer`` on
the ``train.jsonl`` this writes::

    python experiments/benchmarks/export_prompts.py reasoning_gym_chain_sum --out outputs/prompts

With ``--chat-template`` (``policy.use_chat_template``) a prompt is its text after the template.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="a config of conf/data/prompts/, then KEY=VALUE")
    p.add_argument("--policy", default="builtin:smollm2", help="whose tokenizer builds them")
    p.add_argument("--chat-template", action="store_true", help="policy.use_chat_template")
    p.add_argument("--out", type=Path, required=True, help="directory for train/heldout.jsonl")
    args = p.parse_args(argv)

    from hydra.utils import instantiate
    from transformers import AutoTokenizer

    from rlhf_lightning.cli.evaluate import compose_prompt_config
    from rlhf_lightning.models import resolve_model_source

    config = compose_prompt_config(args.data)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(args.policy)[0])
    module = instantiate(config, tokenizer=tokenizer, chat_template=args.chat_template)
    module.setup()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", module.train_items), ("heldout", module.eval_items)):
        with open(args.out / f"{name}.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps({"prompt": item["prompt"], **item["columns"]}) + "\n")
        print(f"{args.out / name}.jsonl: {len(items)} prompts")


if __name__ == "__main__":
    main()
