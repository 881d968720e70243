"""Time PPO iterations of rlhf_lightning, split by phase, with tokens/s, peak memory and MFU.

Runs the real ``PPOModule`` under a Lightning ``Trainer`` (what ``rlhf-train task=ppo`` runs,
without checkpointing, logging or evaluation) and reads the phase times that ``training_step``
logs (``time/sampling``, ``time/scoring`` + ``time/experience``, ``time/update``) from
``trainer.callback_metrics`` after each iteration; s/iter is the wall time from one iteration's
end to the next (Lightning's loop and data loading included). ``--warmup`` iterations run first
and are not timed. See ``bench_common`` for the memory, matmul-peak and FLOP definitions; here

- rollout FLOP    = 2 * N_lm * B * (P + R)                      (prefill + KV-cached decoding)
- experience FLOP = 2 * (N_policy + N_ref + N_reward) * B * (P + R)
- update FLOP     = 6 * N_policy * B * (P + R) * epochs_done    (fwd + bwd of every micro-batch)

with P, R the padded prompt and response widths of the iteration, N_policy the policy with its
value head (and critic backbone, if any), N_reward the reward model's parameters (0 for rule
rewards; its own tokenisation is approximated by the policy's B * (P + R) tokens).

With ``--strategy ddp|fsdp2 --devices N`` it runs N processes (Lightning re-launches the
script for ranks 1..N-1; ``fsdp2`` is ``rlhf_lightning.strategies.FSDP2Strategy``, with
``--rollout-gather full|per_layer``); sizes are per rank, rank 0 reports, times and FLOPs are
rank 0's, and ``memory_per_rank`` lists each rank's parameter, gradient and optimizer-state bytes
(the local shards under fsdp2) and its peak RSS.

Example (tiny model, 1 thread)::

    python experiments/benchmarks/bench_ppo.py --policy builtin:tiny \
        --reward token_fraction target=e --batch 8 --minibatch 4 --epochs 4 --new-tokens 48 \
        --iterations 3 --warmup 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_PROMPTS = REPO / "experiments" / "sentiment" / "data" / "prompts_train.jsonl"

sys.path.insert(0, str(HERE))  # bench_common
from bench_common import add_save_arguments, check_save_arguments, save_due  # noqa: E402

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="builtin:smollm2", help="name_or_path of the policy")
    p.add_argument("--algorithm", default="ppo", help="an algorithm preset (conf/algorithm/)")
    p.add_argument(
        "--reward",
        nargs="+",
        default=["vader"],
        metavar="ARG",
        help="CONFIG [KEY=VALUE ...] of conf/reward/, as rlhf-eval takes it: vader | learned "
        "path=DIR (a saved ScalarRewardModel) | token_fraction target=CHAR",
    )
    p.add_argument(
        "--critic",
        default=None,
        metavar="DIR",
        help="value_model=critic started from this saved reward model (default: shared head)",
    )
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (jsonl/json/csv)")
    p.add_argument("--max-prompt-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="rollouts per iteration")
    p.add_argument("--minibatch", type=int, default=4, help="rollouts per optimizer step")
    p.add_argument("--micro", type=int, default=None, help="rollouts per forward (default: mb)")
    p.add_argument(
        "--experience-batch",
        type=int,
        default=None,
        help="rollouts per no-grad experience forward (default: --micro)",
    )
    p.add_argument("--epochs", type=int, default=4, help="epochs per iteration")
    p.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens of the rollouts")
    p.add_argument(
        "--stop-token", default="eos", help="eos | none (always generate --new-tokens tokens)"
    )
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--sampling-dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="sample from a copy of the policy in this dtype (default: the trained weights)",
    )
    p.add_argument("--iterations", type=int, default=3, help="timed PPO iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations run first")
    p.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--strategy",
        default="single",
        choices=("single", "ddp", "fsdp2"),
        help="single: one process; ddp / fsdp2: --devices processes (FSDP2Strategy for fsdp2)",
    )
    p.add_argument("--devices", type=int, default=1, help="processes (one per GPU on cuda)")
    p.add_argument(
        "--rollout-gather",
        default="full",
        choices=("full", "per_layer"),
        help="fsdp2: how sampling gathers the sharded weights",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--policy-lr", type=float, default=1e-5)
    p.add_argument("--value-lr", type=float, default=1e-4)
    p.add_argument("--adam-eps", type=float, default=1e-5, help="AdamW epsilon (TRL: 1e-8)")
    p.add_argument(
        "--max-grad-norm",
        type=lambda v: None if v.lower() == "none" else float(v),
        default=1.0,
        help="gradient clipping norm, or none (TRL's PPO does not clip)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=5)
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0: full model)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--no-fused-adam", action="store_true", help="PyTorch's default AdamW")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result here")
    p.add_argument(
        "--profile",
        default=None,
        metavar="OUT",
        help="torch.profiler over the timed iterations: ops by self CPU time to OUT (text)",
    )
    add_save_arguments(p)
    args = p.parse_args(argv)
    args.micro = args.micro or args.minibatch
    args.reward_config, args.reward = args.reward, " ".join(args.reward)  # the report's cell
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    if args.strategy == "single" and args.devices != 1:
        p.error("--devices > 1 needs --strategy ddp or fsdp2")
    if args.strategy == "fsdp2" and (args.sampling_dtype or args.compile):
        p.error("--strategy fsdp2 takes neither --sampling-dtype nor --compile")
    check_save_arguments(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from bench_common import (
        RSSSampler,
        compute_dtype,
        count_params,
        current_rss_bytes,
        environment,
        matmul_peak_flops,
        max_rss_bytes,
        phase_summary,
        report,
        set_threads,
    )

    set_threads(args.threads)
    if args.threads is not None:  # else Lightning's distributed strategies set their own count
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    peak = matmul_peak_flops(
        device, compute_dtype(args.precision), args.matmul_size, args.matmul_reps
    )

    import lightning as L
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf_lightning.cli.evaluate import reward_from_config
    from rlhf_lightning.cli.train import CONF_DIR
    from rlhf_lightning.config import rl_config_from
    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.tasks.ppo import build_policy, export_policy

    class ShapeRecordingPPOModule(PPOModule):
        """``PPOModule`` that notes each rollout's padded shape (for the FLOP count) and
        nothing else: the training step itself is untouched."""

        shapes: list[dict] = []

        def update(self, exp, iteration):
            B, P = exp.query_ids.shape
            self.shapes.append(
                {
                    "B": B,
                    "P": P,
                    "R": exp.response_ids.shape[1],
                    "generated_tokens": int(exp.response_mask.sum()),
                }
            )
            return super().update(exp, iteration)

    total_iterations = args.warmup + args.iterations
    groups = ["task=ppo", f"algorithm={args.algorithm}"]
    if args.critic:
        groups.append("algorithm/value_model=critic")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=groups)
    values = {
        "budget.num_iterations": total_iterations,
        "budget.rollout_batch_size": args.batch,
        "budget.minibatch_size": args.minibatch,
        "budget.micro_batch_size": args.micro,
        "budget.experience_batch_size": args.experience_batch,
        "algorithm.epochs": args.epochs,
        "algorithm.optimizer.lr": args.policy_lr,
        "algorithm.optimizer.eps": args.adam_eps,
        "algorithm.optimizer.fused": not args.no_fused_adam,
        "algorithm.lr_schedule": {"_target_": "rlhf_lightning.schedules.Constant"},
        "algorithm.max_grad_norm": args.max_grad_norm,
        "generation.temperature": args.temperature,
        "generation.max_new_tokens": args.new_tokens,
        "generation.stop_token": None if args.stop_token.lower() == "none" else args.stop_token,
        "generation.sampling_dtype": args.sampling_dtype,
        "task.eval_every": 0,
        "task.sample_table_every": 0,
    }
    if OmegaConf.select(cfg, "algorithm.value_model.lr") is not None:
        values["algorithm.value_model.lr"] = args.value_lr
    if args.critic:
        values["algorithm.value_model.path"] = args.critic
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    ppo_cfg = rl_config_from(cfg)
    L.seed_everything(args.seed, verbose=False)
    tokenizer = load_tokenizer(args.policy, padding_side="left")
    datamodule = PromptDataModule(
        path=args.prompts,
        tokenizer=tokenizer,
        max_prompt_length=args.max_prompt_length,
        batch_size=ppo_cfg.prompts_per_iteration,
        eval_batch_size=args.batch,
        seed=args.seed,
        eval_fraction=0.01,
        on_bad_row="skip",
    )
    datamodule.setup("fit")
    reward = reward_from_config(args.reward_config)
    policy_options = {
        "lora": {"r": args.lora, "alpha": 2.0 * args.lora} if args.lora else None,
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": {} if args.compile else None,
    }
    policy_cfg = OmegaConf.create(
        {"policy": {"name_or_path": args.policy, "dtype": "float32", **policy_options}}
    )
    policy, ref_lm = build_policy(policy_cfg, ppo_cfg)
    module = ShapeRecordingPPOModule(
        policy,
        ref_lm,
        tokenizer,
        reward,
        ppo_cfg,
        seed=args.seed,
        policy_source=args.policy,
    )
    module.shapes = []
    n_lm = count_params(policy.lm)
    n_policy = count_params(policy)
    n_ref = count_params(ref_lm)
    n_reward = count_params(getattr(reward, "model", None))
    load_s = time.perf_counter() - t_start

    def local_bytes(tensors) -> int:
        """Bytes this rank holds of ``tensors`` (the local shard of a DTensor)."""
        from torch.distributed.tensor import DTensor

        total = 0
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
        return total

    class MemoryPerRank(L.Callback):
        """After the last iteration: this rank's parameter (policy and a separate reference),
        gradient and optimizer-state bytes and its peak RSS, gathered on every rank."""

        rows: list[dict] = []

        def on_train_end(self, trainer, pl_module) -> None:
            ref = pl_module.ref_lm
            params = [*pl_module.policy.parameters()]
            if isinstance(ref, torch.nn.Module):  # not the LoRA view of the policy
                params += list(ref.parameters())
            optimizer = trainer.optimizers[0]
            state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            row = {
                "rank": trainer.global_rank,
                "param_bytes": local_bytes(params),
                "grad_bytes": local_bytes(p.grad for p in params if p.grad is not None),
                "optimizer_bytes": local_bytes(state),
                "peak_rss_process_bytes": max_rss_bytes(),
            }
            rows = [row]
            if trainer.world_size > 1:
                rows = [None] * trainer.world_size
                torch.distributed.all_gather_object(rows, row)
            self.rows = rows

    class PhaseTimer(L.Callback):
        """Per iteration: the module's logged phase times and score, and the wall time from the
        previous iteration's end (or the start of training) to this one's end, Lightning's loop
        and data loading included. RSS sampling and the GPU peak restart with the first timed
        iteration."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.sampler = RSSSampler()
            self._last_end = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self._last_end = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == args.warmup:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                self.sampler.start()
                if profiler is not None:
                    profiler.start()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.rows.append(
                {
                    "wall_s": now - self._last_end,
                    "global_step": trainer.global_step,
                    "rss_bytes": current_rss_bytes(),
                    **m,
                }
            )
            done = trainer.current_epoch + 1
            if save_due(args, done, total_iterations):  # not timed: the clock restarts after
                export_policy(pl_module, tokenizer, Path(args.save_dir) / f"iter_{done:03d}")
                now = time.perf_counter()
            self._last_end = now

    profiler = None
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    timer = PhaseTimer()
    memory = MemoryPerRank()
    strategy = {"single": "auto", "ddp": "ddp"}.get(args.strategy)
    if args.strategy == "fsdp2":
        from rlhf_lightning.strategies import FSDP2Strategy

        strategy = FSDP2Strategy(rollout_gather=args.rollout_gather)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_epochs=total_iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, memory],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        reload_dataloaders_every_n_epochs=0,
    )
    trainer.fit(module, datamodule=datamodule)
    peak_rss_timed = timer.sampler.stop()
    if not trainer.is_global_zero:
        return {}
    if profiler is not None:
        profiler.stop()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = profiler.key_averages()
        by_self = averages.table(sort_by=sort, row_limit=40)
        by_total = averages.table(sort_by=sort.replace("self_", ""), row_limit=60)
        Path(args.profile).write_text(
            f"ops by self time\n{by_self}\n\nops by total time (children included)\n{by_total}\n"
        )
        print(f"profile of the timed iterations -> {args.profile}")
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    iterations = []
    previous_step = 0
    for row, shape in zip(timer.rows, module.shapes, strict=True):
        tokens = shape["B"] * (shape["P"] + shape["R"])
        epochs_done = row["policy/epochs"]
        iterations.append(
            {
                "iteration_s": row["wall_s"],
                "step_s": row["time/iteration"],
                "rollout_s": row["time/sampling"],
                "experience_s": row["time/scoring"] + row["time/experience"],
                "update_s": row["time/update"],
                "generated_tokens": shape["generated_tokens"],
                "trained_tokens": shape["generated_tokens"] * epochs_done,
                "response_length": row["rollout/response_length"],
                "padded_shape": shape,
                "epochs_done": epochs_done,
                "optimizer_steps": row["global_step"] - previous_step,
                "flop_rollout": 2.0 * n_lm * tokens,
                "flop_experience": 2.0 * (n_policy + n_ref + n_reward) * tokens,
                "flop_update": 6.0 * n_policy * tokens * epochs_done,
                "score": row["objective/score"],
                "kl": row["kl/sequence"],
                "sampler_kl": row.get("rollout/sampler_kl"),
                "rss_bytes": row["rss_bytes"],
                "padding_frac": row.get("perf/padding_frac"),
                "padding_frac_untrimmed": row.get("perf/padding_frac_untrimmed"),
            }
        )
        previous_step = row["global_step"]
    timed = iterations[args.warmup :]
    summary = phase_summary(timed, peak["flops"])
    summary.update(
        {
            "scores": [it["score"] for it in iterations],
            "optimizer_steps_per_iteration": [it["optimizer_steps"] for it in iterations],
            "peak_rss_process_bytes": max_rss_bytes(),
            "peak_rss_timed_bytes": peak_rss_timed if device.type == "cpu" else None,
            "peak_gpu_bytes": peak_gpu,
            "load_s": load_s,
            "memory_per_rank": memory.rows,
        }
    )
    result = {
        "framework": "rlhf_lightning",
        "args": vars(args) | {"threads": args.threads or torch.get_num_threads()},
        "params": {"lm": n_lm, "policy": n_policy, "ref": n_ref, "reward": n_reward},
        "matmul_peak": peak,
        "summary": summary,
        "iterations": iterations,
        "environment": environment(device, lightning=L.__version__),
    }
    return report(result)


if __name__ == "__main__":
    main()
