"""Save an *untrained* reward model (backbone + fresh 1-logit head) for timing runs only.

bench_ppo.py with ``--reward learned path=DIR --critic DIR`` then runs the same four models as TRL's
PPO (policy, reference, value model, reward model, all on the policy's backbone), so the two
frameworks do comparable work. Its scores mean nothing: use it to time, not to train.

    python experiments/benchmarks/make_timing_rm.py --backbone builtin:smollm2 --out DIR
"""

from __future__ import annotations

import argparse
import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="builtin:smollm2", help="name_or_path of the backbone")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--head-std",
        type=float,
        default=None,
        help="initialise the head N(0, STD) with zero bias (TRL's value head: 0.02); default: "
        "the reward model's own init, N(0, 1/sqrt(d+1))",
    )
    args = p.parse_args(argv)

    import torch

    from rlhf_lightning.models import ScalarRewardModel, load_reward_tokenizer

    torch.manual_seed(args.seed)
    model = ScalarRewardModel.from_backbone(args.backbone)
    if args.head_std is not None:
        with torch.no_grad():
            torch.nn.init.normal_(model.head.weight, std=args.head_std)
            model.head.bias.zero_()
    tokenizer = load_reward_tokenizer(args.backbone)
    model.save_pretrained(args.out, tokenizer)
    print(f"untrained reward model on {args.backbone} -> {args.out}")


if __name__ == "__main__":
    main()
