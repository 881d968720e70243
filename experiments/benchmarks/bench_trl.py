"""Time TRL's PPO (``trl==1.12.0``, ``trl.experimental.ppo``) on the workload of bench_ppo.py.

Run it in the TRL venv (``setup_trl_venv.sh``). The policy and reference are the causal LM in
``--model-dir``; the value model (and, with ``--reward rm``, the reward model) is an
``AutoModelForSequenceClassification`` with one logit on the same directory, i.e. the policy's
backbone and tokenizer with a fresh linear ``score`` head: TRL feeds the policy's token ids
straight into both, so they must share its tokenizer. ``--reward vader`` / ``token_fraction:C``
score the decoded response text instead (the same reward sources as bench_ppo.py): a stand-in
module takes the reward model's place and ``get_reward`` is wrapped to score it.

TRL has no phase timers, so module-level functions of ``trl.experimental.ppo.ppo_trainer`` are
wrapped (timing only, behaviour unchanged):

- rollout    = ``batch_generation`` (sampling of the whole rollout batch);
- experience = end of generation -> the first ``forward`` of the trained policy+value wrapper
  (logprobs from the generation scores, reference, value and reward forwards, GAE);
- update     = that forward -> ``on_step_end`` (PPO epochs, metric logging, LR step);
- iteration  = ``on_step_end`` -> ``on_step_end`` (includes TRL's data loading and gc.collect).

FLOPs (see bench_common): rollout 2 N_policy B (P + R); experience 2 (N_ref + N_value +
N_reward) B (P + R) -- TRL takes old logprobs from the generation scores, so no policy forward;
update 6 (N_policy + N_value) B (P + R) epochs. Gradient checkpointing (TRL's default, off here
unless ``--gradient-checkpointing``) recomputes the forward; that is not counted (model FLOPs).

Size mapping: ``per_device_train_batch_size = micro``, ``gradient_accumulation_steps = batch /
micro``, ``num_mini_batches = batch / minibatch``. TRL calls ``optimizer.step()`` inside
``accelerator.accumulate``, which only steps every ``gradient_accumulation_steps`` micro-batches;
the optimizer steps actually taken are counted and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_PROMPTS = REPO / "experiments" / "sentiment" / "data" / "prompts_train.jsonl"
PREFERRED_PAD_TOKEN = "<|endoftext|>"

sys.path.insert(0, str(HERE))  # bench_common
from bench_common import add_save_arguments, check_save_arguments, save_due  # noqa: E402

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model-dir",
        default=None,
        help="HF directory of the policy (default: resolve --policy with rlhf_lightning)",
    )
    p.add_argument("--policy", default="builtin:smollm2", help="used when --model-dir is unset")
    p.add_argument(
        "--reward",
        default="rm",
        help="rm (1-logit seq-cls head on --model-dir) | rm:DIR | vader | token_fraction:CHAR",
    )
    p.add_argument("--value-model-dir", default=None, help="backbone of the value model")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="jsonl file of prompts")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--max-prompt-length", type=int, default=64, help="keep the last N tokens")
    p.add_argument("--batch", type=int, default=8, help="rollouts per iteration")
    p.add_argument("--minibatch", type=int, default=4, help="rollouts per minibatch")
    p.add_argument("--micro", type=int, default=None, help="rollouts per forward (default: mb)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration")
    p.add_argument("--new-tokens", type=int, default=48, help="response_length")
    p.add_argument("--stop-token", default="eos", choices=("eos", "none"))
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--rollout-forward-batch",
        type=int,
        default=None,
        help="local_rollout_forward_batch_size: rows per generate/forward (default: --batch)",
    )
    p.add_argument("--iterations", type=int, default=3, help="timed PPO iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations run first")
    p.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--lr", type=float, default=1e-5, help="one LR for policy and value")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default is on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result here")
    add_save_arguments(p)
    args = p.parse_args(argv)
    args.micro = args.micro or args.minibatch
    args.rollout_forward_batch = args.rollout_forward_batch or args.batch
    if args.batch % args.minibatch or args.minibatch % args.micro:
        p.error("--minibatch must divide --batch and --micro must divide --minibatch")
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    check_save_arguments(p, args)
    return args


def resolve_model_dir(args) -> str:
    if args.model_dir:
        return args.model_dir
    try:
        from rlhf_lightning.models import resolve_model_source
    except ImportError:
        raise SystemExit(
            "--model-dir is required where rlhf_lightning is not installed; get it with\n"
            "  python -c 'from rlhf_lightning.models import resolve_model_source as r; "
            f'print(r("{args.policy}")[0])\''
        ) from None
    return resolve_model_source(args.policy)[0]


def load_tokenizer(model_dir: str):
    """Left-padding tokenizer whose pad token is not eos (``<|endoftext|>``, as rlhf_lightning
    picks): TRL finds response ends by the pad id, so pad must differ from the stop token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        if PREFERRED_PAD_TOKEN in tok.get_vocab() and tok.eos_token != PREFERRED_PAD_TOKEN:
            tok.pad_token = PREFERRED_PAD_TOKEN
        else:
            raise SystemExit(f"{model_dir}: no pad token distinct from eos")
    return tok


def read_prompts(path: str, column: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)[column] for line in f if line.strip()]


def text_scorer(spec: str):
    """``vader`` / ``token_fraction:C`` -> a function of response texts (as bench_ppo scores)."""
    kind, _, value = spec.partition(":")
    if kind == "vader":
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        return lambda texts: [analyzer.polarity_scores(t)["compound"] for t in texts]
    if kind == "token_fraction" and len(value) == 1:
        return lambda texts: [t.count(value) / len(t) if t else 0.0 for t in texts]
    raise SystemExit(f"--reward: expected rm | rm:DIR | vader | token_fraction:CHAR, got {spec!r}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from bench_common import (
        RSSSampler,
        compute_dtype,
        count_params,
        environment,
        matmul_peak_flops,
        max_rss_bytes,
        phase_summary,
        report,
        set_threads,
        sync,
    )

    set_threads(args.threads)
    device = torch.device(args.device)
    model_dir = resolve_model_dir(args)
    t_start = time.perf_counter()
    peak = matmul_peak_flops(
        device, compute_dtype(args.precision), args.matmul_size, args.matmul_reps
    )

    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id
    stop_id = tokenizer.eos_token_id if args.stop_token == "eos" else None

    prompts = read_prompts(args.prompts, args.prompt_column)
    ids = [tokenizer(p)["input_ids"][-args.max_prompt_length :] for p in prompts]
    train_dataset = Dataset.from_dict({"input_ids": ids})
    eval_dataset = Dataset.from_dict({"input_ids": ids[: args.batch]})

    torch.manual_seed(args.seed)  # the fresh score heads
    dtype = torch.float32  # weights fp32; --precision bf16-mixed autocasts (as bench_ppo)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)

    def seq_cls(path: str):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = pad_id
        return model

    value_model = seq_cls(args.value_model_dir or model_dir)
    kind, _, rm_dir = args.reward.partition(":")
    if kind == "rm":
        reward_model, score_texts = seq_cls(rm_dir or model_dir), None
    else:
        score_texts = text_scorer(args.reward)
        reward_model = torch.nn.Linear(1, 1)  # stand-in: TRL moves it, get_reward skips it

        original_get_reward = ppo_mod.get_reward

        def get_reward(model, query_responses, pad_token_id, context_length):
            if model is not reward_model:
                return original_get_reward(model, query_responses, pad_token_id, context_length)
            responses = query_responses[:, context_length:]
            texts = [
                tokenizer.decode(row[row != pad_token_id], skip_special_tokens=True)
                for row in responses
            ]
            scores = torch.tensor(score_texts(texts), dtype=torch.float32)
            lengths = ppo_mod.first_true_indices(responses == pad_token_id) - 1 + context_length
            return None, scores.to(query_responses.device), lengths

        ppo_mod.get_reward = get_reward

    n_policy = count_params(policy)
    n_ref = count_params(ref)
    n_value = count_params(value_model)
    n_reward = count_params(reward_model) if score_texts is None else 0

    total_iterations = args.warmup + args.iterations
    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    config = PPOConfig(
        output_dir=out_dir,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.batch // args.micro,
        num_mini_batches=args.batch // args.minibatch,
        num_ppo_epochs=args.epochs,
        total_episodes=args.batch * total_iterations,
        local_rollout_forward_batch_size=args.rollout_forward_batch,
        response_length=args.new_tokens,
        stop_token="eos" if args.stop_token == "eos" else None,
        temperature=args.temperature,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        bf16=args.precision == "bf16-mixed",
        fp16=False,
        use_cpu=args.device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing,
        num_sample_generations=0,
        seed=args.seed,
    )

    # ---- timing hooks (wrappers around TRL's module-level functions; behaviour unchanged)
    clock: dict = {"rows": [], "cur": {}, "update_model": None, "opt_steps": 0}

    original_generation = ppo_mod.batch_generation

    def batch_generation(model, queries, *rest, **kw):
        sync(device)
        t0 = time.perf_counter()
        query_responses, logits = original_generation(model, queries, *rest, **kw)
        sync(device)
        responses = query_responses[:, queries.shape[1] :]
        B, R = responses.shape
        if stop_id is not None:
            first_stop = ppo_mod.first_true_indices(responses == stop_id)
            lengths = torch.where(first_stop < R, first_stop + 1, (responses != pad_id).sum(1))
        else:
            lengths = (responses != pad_id).sum(1)
        clock["cur"].update(
            gen_start=t0,
            gen_end=time.perf_counter(),
            B=B,
            P=queries.shape[1],
            R=R,
            generated_tokens=int(lengths.sum()),
        )
        return query_responses, logits

    original_forward = ppo_mod.forward

    def forward(model, *rest, **kw):
        if model is clock["update_model"] and "update_start" not in clock["cur"]:
            sync(device)
            clock["cur"]["update_start"] = time.perf_counter()
        return original_forward(model, *rest, **kw)

    ppo_mod.batch_generation = batch_generation
    ppo_mod.forward = forward

    sampler = RSSSampler()

    class IterationClock(TrainerCallback):
        def __init__(self) -> None:
            self.last = 0.0

        def _maybe_start_timed(self, done: int) -> None:
            if done == args.warmup:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sampler.start()

        def on_train_begin(self, *a, **kw):
            self._maybe_start_timed(0)
            self.last = time.perf_counter()

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                clock["cur"]["logs"] = dict(logs)

        def on_step_end(self, *a, **kw):
            sync(device)
            now = time.perf_counter()
            row = clock["cur"]
            row.update(end=now, start=self.last, optimizer_steps=clock["opt_steps"])
            clock["rows"].append(row)
            clock["cur"], clock["opt_steps"] = {}, 0
            done = len(clock["rows"])
            if save_due(args, done, total_iterations):  # not timed: the clock restarts after
                trained = clock["trainer"].accelerator.unwrap_model(clock["trainer"].model)
                out = Path(args.save_dir) / f"iter_{done:03d}"
                trained.policy.save_pretrained(out, safe_serialization=True)
                tokenizer.save_pretrained(out)
                now = time.perf_counter()
            self.last = now
            self._maybe_start_timed(len(clock["rows"]))

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=[IterationClock()],
    )
    clock["update_model"] = trainer.model
    clock["trainer"] = trainer
    torch_optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)

    def count_step(*_a, **_kw):
        clock["opt_steps"] += 1

    torch_optimizer.register_step_post_hook(count_step)
    set_threads(args.threads)  # in case accelerate changed it
    load_s = time.perf_counter() - t_start
    trainer.train()
    peak_rss_timed = sampler.stop()
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    iterations = []
    for row in clock["rows"]:
        tokens = row["B"] * (row["P"] + row["R"])
        logs = row.get("logs", {})
        iterations.append(
            {
                "iteration_s": row["end"] - row["start"],
                "rollout_s": row["gen_end"] - row["gen_start"],
                "experience_s": row["update_start"] - row["gen_end"],
                "update_s": row["end"] - row["update_start"],
                "generated_tokens": row["generated_tokens"],
                "trained_tokens": row["generated_tokens"] * args.epochs,
                "response_length": row["generated_tokens"] / row["B"],
                "padded_shape": {k: row[k] for k in ("B", "P", "R")},
                "optimizer_steps": row["optimizer_steps"],
                "flop_rollout": 2.0 * n_policy * tokens,
                "flop_experience": 2.0 * (n_ref + n_value + n_reward) * tokens,
                "flop_update": 6.0 * (n_policy + n_value) * tokens * args.epochs,
                "score": logs.get("objective/scores"),
                "kl": logs.get("objective/kl"),
            }
        )
    timed = iterations[args.warmup :]
    summary = phase_summary(timed, peak["flops"])
    summary.update(
        {
            "scores": [it["score"] for it in iterations if it["score"] is not None],
            "optimizer_steps_per_iteration": [it["optimizer_steps"] for it in iterations],
            "peak_rss_process_bytes": max_rss_bytes(),
            "peak_rss_timed_bytes": peak_rss_timed if device.type == "cpu" else None,
            "peak_gpu_bytes": peak_gpu,
            "load_s": load_s,
        }
    )
    result = {
        "framework": f"trl {trl.__version__}",
        "args": vars(args) | {"policy": model_dir, "threads": torch.get_num_threads()},
        "params": {"policy": n_policy, "ref": n_ref, "value": n_value, "reward": n_reward},
        "matmul_peak": peak,
        "summary": summary,
        "iterations": iterations,
        "environment": environment(
            device, transformers=transformers.__version__, trl=trl.__version__
        ),
    }
    return report(result)


if __name__ == "__main__":
    main()
