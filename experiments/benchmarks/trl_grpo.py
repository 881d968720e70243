"""TRL's ``GRPOTrainer`` (``trl==1.12.0``) on a reasoning-gym task, with its wall time and memory.

Runs in the TRL venv (``setup_trl_venv.sh``, which also installs reasoning-gym). The prompts
are the ``train.jsonl`` that ``export_prompts.py`` writes from rlhf_lightning's prompt config
(the same few-shot text and the same ``reasoning_gym`` column), and the reward is the one
``reward=reasoning_gym`` computes: the response's first line (``first_line``) scored by the
generator's own verifier, 1 for full marks, else 0 (``--reward vader``: VADER's compound score,
for the sentiment prompts). Generation ends at the newline (``--stop eos``: at eos): TRL stops
and masks at its tokenizer's eos, so the tokenizer's eos is set to the newline token.

Sizes map to rlhf_lightning's as in bench_trl.py: ``per_device_train_batch_size = micro``,
``gradient_accumulation_steps = minibatch / micro``, ``steps_per_generation = rollout / micro``
(one generation of ``rollout`` responses), ``num_iterations = epochs``, and
``max_steps = iterations * rollout / minibatch * epochs`` optimizer steps.

Writes ``--out/result.json``: the wall time of every optimizer step from the start of training
(the time to save checkpoints taken out), the mean reward of each generation, and the peak RSS;
``--save-at`` saves the policy at those steps (``--out/step<N>``) for ``rlhf-eval``::

    /tmp/trl-venv/bin/python experiments/benchmarks/trl_grpo.py --model-dir DIR \\
        --prompts outputs/prompts/train.jsonl --out outputs/trl_grpo/seed0 --seed 0 --save-at 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_common
from bench_common import RSSSampler, max_rss_bytes  # noqa: E402

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="HF directory of the policy")
    p.add_argument("--prompts", required=True, help="train.jsonl of export_prompts.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=8, help="generations")
    p.add_argument("--rollout", type=int, default=32, help="responses per generation")
    p.add_argument("--group", type=int, default=4, help="num_generations (samples per prompt)")
    p.add_argument("--minibatch", type=int, default=16, help="responses per optimizer step")
    p.add_argument("--micro", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--epochs", type=int, default=2, help="num_iterations")
    p.add_argument("--new-tokens", type=int, default=16, help="max_completion_length")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--adam-eps", type=float, default=1e-5, help="rlhf_lightning's AdamW eps")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="TRL's default: on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-at", type=int, nargs="*", default=[], help="optimizer steps")
    p.add_argument(
        "--reward",
        default="reasoning_gym",
        choices=("reasoning_gym", "vader"),
        help="the verifier of each prompt's problem, or VADER's compound score of the response",
    )
    p.add_argument(
        "--stop", default="newline", choices=("newline", "eos"), help="what ends a response"
    )
    args = p.parse_args(argv)
    if args.rollout % args.minibatch or args.minibatch % args.micro or args.rollout % args.group:
        p.error("--minibatch must divide --rollout, --micro --minibatch, --group --rollout")
    return args


def first_line(response: str) -> str | None:
    """The answer rlhf_lightning's ``first_line`` extracts (rewards/verifiers.py)."""
    answer = response.strip().split("\n", 1)[0].strip()
    return answer or None


class Verifier:
    """1.0 where the problem's own reasoning-gym verifier gives the answer full marks, else 0."""

    def __init__(self) -> None:
        self.__name__ = "reasoning_gym"
        self.entries: dict[str, tuple[object, dict]] = {}

    def entry(self, item: str):
        if item not in self.entries:
            import reasoning_gym

            spec = json.loads(item)
            dataset = reasoning_gym.create_dataset(
                spec["generator"], seed=int(spec["seed"]), size=1, **spec["difficulty"]
            )
            self.entries[item] = (dataset, dataset[int(spec["index"])])
        return self.entries[item]

    def score(self, response: str, item: str) -> float:
        dataset, entry = self.entry(item)
        answer = first_line(response)
        if answer is None:
            return 0.0
        try:
            return float(float(dataset.score_answer(answer, entry)) >= 1.0)
        except Exception:  # a malformed answer scores 0, as in rlhf_lightning
            return 0.0

    def __call__(self, prompts, completions, reasoning_gym, **kwargs) -> list[float]:
        return [self.score(c, item) for c, item in zip(completions, reasoning_gym, strict=True)]


def vader(prompts, completions, **kwargs) -> list[float]:
    """VADER's compound score of each response (rlhf_lightning's ``reward=vader``)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in completions]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    lines = Path(args.prompts).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    dataset = Dataset.from_dict(columns)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = "<|endoftext|>"  # the pad rlhf_lightning picks for SmolLM2
    if args.stop == "newline":
        (newline,) = tokenizer.encode("\n", add_special_tokens=False)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(newline)  # stop and mask at "\n"

    steps_per_iteration = args.rollout // args.minibatch * args.epochs
    config = GRPOConfig(
        output_dir=str(args.out),
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.minibatch // args.micro,
        steps_per_generation=args.rollout // args.micro,
        num_generations=args.group,
        num_iterations=args.epochs,
        max_steps=args.iterations * steps_per_iteration,
        max_completion_length=args.new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        adam_epsilon=args.adam_eps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type="grpo",
        gradient_checkpointing=not args.no_gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )

    class Clock(TrainerCallback):
        """Wall time of every optimizer step from the start of training, saving not counted."""

        def __init__(self) -> None:
            self.start, self.saving, self.steps = None, 0.0, []

        def on_train_begin(self, args_, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, **kw):
            self.steps.append(time.perf_counter() - self.start - self.saving)
            if state.global_step in args.save_at:
                began = time.perf_counter()
                model.save_pretrained(args.out / f"step{state.global_step}")
                tokenizer.save_pretrained(args.out / f"step{state.global_step}")
                self.saving += time.perf_counter() - began

    clock = Clock()
    trainer = GRPOTrainer(
        model=args.model_dir,
        reward_funcs=Verifier() if args.reward == "reasoning_gym" else vader,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    sampler = RSSSampler()
    sampler.start()
    trainer.train()
    peak_timed = sampler.stop()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    result = {
        "framework": "trl",
        "trl_version": __import__("trl").__version__,
        "seed": args.seed,
        "step_wall_s": clock.steps,
        "steps_per_iteration": steps_per_iteration,
        "reward_by_step": rewards,
        "peak_rss_bytes": max_rss_bytes(),
        "peak_rss_timed_bytes": peak_timed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("seed", "peak_rss_bytes")}), clock.steps[-1])
    return result


if __name__ == "__main__":
    main()
