"""PPOModule: RLHF with PPO as a LightningModule with manual optimization.

One Lightning **epoch** is one PPO iteration: the train dataloader yields exactly one batch of
prompts per epoch (``RolloutSampler``), and ``training_step`` on it does

1. **rollout** -- sample a response per prompt from the current policy (KV cache, ``top_k=0``,
   ``top_p=1``, temperature T), truncate after the first stop token;
2. **experience** -- old logprobs and values (one policy forward), reference logprobs (one
   forward of the frozen reference), scores from the reward source, per-token KL-penalised
   rewards, GAE, advantage whitening over the whole batch on all ranks (:mod:`..rollout`);
3. **update** -- ``ppo_epochs`` x shuffled minibatches x micro-batches: clipped policy loss +
   ``vf_coef`` x clipped value loss - ``ent_coef`` x entropy (+ beta x KL when the KL is a loss
   term); one optimizer and LR-scheduler step per minibatch; the epoch loop stops early when the
   approx KL exceeds ``target_kl``;
4. **log** -- everything, namespaced (``objective/``, ``kl/``, ``policy/``, ``value/``, ``loss/``,
   ``optim/`` (gradient norm before clipping, share of clipped steps), ``rollout/`` (incl.
   ``sampler_kl``: how far the distribution sampled from is from the one the losses use),
   ``time/``, ``perf/``).

The first ``critic_warmup_iterations`` iterations update the value function alone (step 3 with
the value loss only; the policy gets no gradient, and an adaptive KL controller is left alone).

Counters: ``trainer.current_epoch`` counts PPO iterations; ``trainer.global_step`` counts
optimizer steps (``ppo_epochs * rollout_batch_size / minibatch_size`` per iteration, fewer when
``target_kl`` stops an epoch loop early). The TensorBoard x-axis of ``train`` metrics is the
iteration.

Departures from the N+ reproduction (Huang et al. 2024), all configurable: the defaults sample at
temperature 0.7 (not 1.0) and use small CPU-sized batches. The loss of a minibatch is the token
mean over all its responses; micro-batches are weighted by their share of those tokens, so
gradient accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch
import torch.distributed as dist
from torch.profiler import record_function

from rlhf_lightning.config import PPOConfig
from rlhf_lightning.errors import UserError
from rlhf_lightning.evaluation import sequence_kl as eval_sequence_kl
from rlhf_lightning.hardware import resolve_sampling_dtype
from rlhf_lightning.kl import kl_penalty
from rlhf_lightning.losses import explained_variance, ppo_policy_loss, value_loss
from rlhf_lightning.ops import entropy_from_logits, logprobs_from_logits, masked_mean
from rlhf_lightning.optim import adamw, trainer_precision
from rlhf_lightning.rollout.experience import Experience, make_experience, sequence_kl
from rlhf_lightning.rollout.generation import (
    Rollout,
    resolve_stop_token_ids,
    sample_responses,
    sampling_copy,
)
from rlhf_lightning.schedules import warmup_decay_lambda

EVAL_SEED = 1234


class NonFiniteError(UserError, FloatingPointError):
    """A NaN or inf in a quantity PPO depends on."""


def _all_ranks_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a 0-dim tensor over all ranks (identity with one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone().float()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class PPOModule(L.LightningModule):
    """PPO on a causal LM with a value head (or a separate critic) against a reward source.

    Args:
        policy: ``PolicyWithValueHead``; its ``lm`` samples and is trained.
        ref_lm: the frozen reference LM (same tokenizer, the policy's dtype). It is kept out of
            the module's ``state_dict`` and optimizer: it is rebuilt from config on resume.
        tokenizer: the policy tokenizer (left padding).
        reward: a reward source, ``reward(prompts, responses) -> (B,)``.
        cfg: validated PPO coefficients.
        kl_controller: FixedKLController / AdaptiveKLController.
        gold_reward: optional reward source used only for evaluation (never trained on).
        seed: base of the per-iteration seeds (:meth:`iteration_seed`).
        policy_source: ``name_or_path`` of the base policy, stored in checkpoints so tools
            (``rlhf-generate``, ``rlhf-eval``) can rebuild the model from a ``.ckpt``.
        policy_lora: the LoRA settings of the policy (``asdict(LoRAConfig)``) or None, stored in
            checkpoints for the same reason. With LoRA, ``ref_lm`` is
            :class:`~rlhf_lightning.models.adapters.AdaptersDisabled` (the policy's own weights).
    """

    def __init__(
        self,
        policy,
        ref_lm,
        tokenizer,
        reward,
        cfg: PPOConfig,
        kl_controller,
        gold_reward=None,
        seed: int = 0,
        policy_source: str | None = None,
        policy_lora: dict | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        # Held outside nn.Module registration: no grad, no optimizer state, no checkpoint bytes.
        self._frozen = {"ref": ref_lm}
        if isinstance(ref_lm, torch.nn.Module):  # a separate copy (not the LoRA base view)
            for p in ref_lm.parameters():
                p.requires_grad_(False)
            ref_lm.eval()
        self.tokenizer = tokenizer
        self.reward = reward
        self.gold_reward = gold_reward
        self.cfg = cfg
        self.kl_ctl = kl_controller
        self.seed = seed
        self.policy_source = policy_source
        self.policy_lora = policy_lora
        self.stop_token_ids = resolve_stop_token_ids(tokenizer, cfg.generation.stop_token)
        self.nonfinite_skips = 0
        # (prompt, response, reward[, gold]) of the first eval batch of the latest eval.
        self.val_samples: list[tuple] = []

    @property
    def ref_lm(self):
        return self._frozen["ref"]

    # ----------------------------------------------------------------------------------- setup
    def iteration_seed(self, iteration: int) -> int:
        """The torch seed of one iteration: a pure function of (seed, iteration, rank).

        Sampling and minibatch shuffles of iteration k are thereby reproducible on their own, so
        a run resumed from a checkpoint continues exactly like an uninterrupted one without
        saving RNG states, and ranks sample different responses (N+: per-rank seeds differ).
        """
        return (self.seed * 1_000_003 + iteration) * 1_009 + self.global_rank

    def place_frozen_models(self) -> None:
        """Move the reference and the reward sources (not Lightning-managed) to our device."""
        self.ref_lm.to(self.device)
        for source in (self.reward, self.gold_reward):
            if source is not None and hasattr(source, "to"):
                source.to(self.device)

    def on_fit_start(self) -> None:
        self.place_frozen_models()

    def on_validation_start(self) -> None:  # also runs for trainer.validate() before fit
        self.place_frozen_models()

    def configure_optimizers(self):
        policy_params, value_params = [], []
        for name, param in self.policy.named_parameters():
            if param.requires_grad:
                (policy_params if name.startswith("lm.") else value_params).append(param)
        groups = [{"params": policy_params, "lr": self.cfg.policy_lr}]
        if value_params:
            groups.append({"params": value_params, "lr": self.cfg.value_lr})
        # Lightning's fp16 GradScaler path cannot clip gradients of a fused optimizer.
        optimizer = adamw(
            groups,
            fused=self.cfg.fused_adam and trainer_precision(self) != "16-mixed",
            eps=self.cfg.adam_eps,
            weight_decay=self.cfg.weight_decay,
        )
        total = self.cfg.num_iterations * self.cfg.optimizer_steps_per_iteration
        schedule = warmup_decay_lambda(
            total_steps=total,
            warmup_steps=int(self.cfg.warmup_ratio * total),
            decay=self.cfg.lr_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    # ------------------------------------------------------------------------------- training
    def sampling_lm(self):
        """The LM that samples rollouts: the policy's, or its ``generation.sampling_dtype`` copy
        (refreshed from the policy here, so it always holds the current weights)."""
        dtype = resolve_sampling_dtype(self.cfg.generation.sampling_dtype, self.device.type)
        if dtype is None:
            return self.policy.lm
        previous = self._frozen.get("sampler")
        self._frozen["sampler"] = sampling_copy(self.policy.lm, getattr(torch, dtype), previous)
        return self._frozen["sampler"]

    def sample(self, batch: dict) -> Rollout:
        """One response per prompt of a ``PromptDataModule`` batch, from the current policy."""
        return sample_responses(
            self.sampling_lm(),
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            batch["prompts"],
            self.cfg.generation,
            self.stop_token_ids,
        )

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        iteration = self.current_epoch
        torch.manual_seed(self.iteration_seed(iteration))
        t0 = time.perf_counter()
        self.policy.eval()
        with record_function("ppo/rollout"):  # labels for torch.profiler; free without one
            rollout = self.sample(batch)
        t1 = time.perf_counter()
        with record_function("ppo/reward"):
            raw_scores = torch.as_tensor(self.reward(rollout.prompts, rollout.responses)).float()
        raw_scores = raw_scores.to(self.device)
        self._check_finite("reward scores", raw_scores, iteration)
        kl_coef = float(self.kl_ctl.value)
        with record_function("ppo/experience_forwards"):
            exp = make_experience(self.policy, self.ref_lm, rollout, raw_scores, cfg, kl_coef)
        mask = exp.response_mask
        for name in ("old_logprobs", "ref_logprobs", "old_values"):
            self._check_finite(name.replace("_", " "), getattr(exp, name)[mask], iteration)
        t2 = time.perf_counter()
        self.policy.train()
        with record_function("ppo/update"):
            update = self.ppo_update(exp, iteration)
        self.policy.eval()
        t3 = time.perf_counter()

        seq_kl = sequence_kl(exp)
        world = self.trainer.world_size if self.trainer is not None else 1
        kl_now = float(_all_ranks_mean(seq_kl.mean()))  # every rank joins the reduction
        if iteration >= cfg.critic_warmup_iterations:  # in warm-up the policy does not move
            self.kl_ctl.update(kl_now, len(exp.prompts) * world)
        metrics = self._rollout_metrics(exp, raw_scores, seq_kl, kl_coef)
        if rollout.sampler_logprobs is not None:
            # How far the distribution sampled from is from the one the losses use (k1 over
            # the sampled tokens): ~0 unless top-k/top-p, min_new_tokens or a lower-precision
            # sampling copy reshape it.
            gap = (rollout.sampler_logprobs.to(mask.device) - exp.old_logprobs)[mask]
            metrics["rollout/sampler_kl"] = gap.mean()
            metrics["rollout/sampler_logprob_max_abs_diff"] = gap.abs().max()
        metrics.update(update)
        n_generated = float(mask.sum())
        n_trained = n_generated * update["policy/epochs"]
        metrics.update(
            {
                "time/rollout": t1 - t0,
                "time/experience": t2 - t1,
                "time/update": t3 - t2,
                "time/iteration": t3 - t0,
                "perf/generated_tokens_per_s": n_generated / max(t1 - t0, 1e-9),
                "perf/trained_tokens_per_s": n_trained / max(t3 - t2, 1e-9),
                "perf/lr": self.optimizers().param_groups[0]["lr"],
                "perf/nonfinite_skips": float(self.nonfinite_skips),
            }
        )
        self.log_dict(
            {k: float(v) for k, v in metrics.items()},
            on_step=True,
            on_epoch=False,
            sync_dist=world > 1,
            batch_size=len(exp.prompts),
        )
        self.log("objective/score_pb", metrics["objective/score"], prog_bar=True, logger=False)
        self.log("kl_pb", metrics["kl/sequence"], prog_bar=True, logger=False)
        if cfg.sample_table_every and (iteration + 1) % cfg.sample_table_every == 0:
            self._log_samples("train/samples", exp.prompts, exp.responses, exp.scores.tolist())

    def ppo_update(self, exp: Experience, iteration: int) -> dict[str, float]:
        """``ppo_epochs`` x shuffled minibatches x micro-batches of clipped PPO updates (of the
        value function alone in the first ``critic_warmup_iterations``)."""
        cfg = self.cfg
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        sums: dict[str, float] = defaultdict(float)
        ratio_max, minibatches, epochs_done = 0.0, 0, 0
        for _ in range(cfg.ppo_epochs):
            epoch_kl = []
            for rows in torch.randperm(len(exp.prompts)).split(cfg.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                stats = self.minibatch_backward(
                    exp, rows, cfg.micro_batch_size, self.manual_backward, iteration
                )
                if stats is None:  # non-finite loss, skipped (on_nonfinite=skip)
                    optimizer.zero_grad(set_to_none=True)
                    self.nonfinite_skips += 1
                    continue
                with record_function("ppo/clip_gradients"):
                    grad_norm = self._clip_gradients(optimizer, cfg.max_grad_norm)
                if grad_norm is not None:
                    stats["optim/grad_norm"] = grad_norm
                    clipped = cfg.max_grad_norm is not None and grad_norm > cfg.max_grad_norm
                    stats["optim/clipped_frac"] = float(clipped)
                optimizer.step()
                scheduler.step()
                minibatches += 1
                ratio_max = max(ratio_max, stats.pop("policy/ratio_max", 0.0))
                if "policy/approx_kl" in stats:  # absent in critic warm-up
                    epoch_kl.append(stats["policy/approx_kl"])
                for key, value in stats.items():
                    sums[key] += value
            epochs_done += 1
            if cfg.target_kl is not None and epoch_kl:
                mean_kl = float(_all_ranks_mean(torch.tensor(sum(epoch_kl) / len(epoch_kl))))
                if mean_kl > cfg.target_kl:
                    break
        out = {key: value / max(minibatches, 1) for key, value in sums.items()}
        if iteration >= cfg.critic_warmup_iterations:
            out["policy/ratio_max"] = ratio_max
        out["policy/epochs"] = float(epochs_done)
        out["value/warmup"] = float(iteration < cfg.critic_warmup_iterations)
        return out

    def minibatch_backward(
        self, exp: Experience, rows: torch.Tensor, micro_batch_size: int, backward, iteration: int
    ) -> dict[str, float] | None:
        """Accumulate the gradient of one minibatch (``rows`` of ``exp``) in micro-batches.

        Each micro-batch's loss is weighted by its share of the minibatch's response tokens, so
        the accumulated gradient equals that of the token-mean loss over the whole minibatch.
        In critic warm-up (``iteration < critic_warmup_iterations``) the loss is the value loss
        alone and only the value function gets gradients. Returns the token-weighted statistics,
        or None when a loss was non-finite and ``on_nonfinite=skip`` (with ``error`` it raises
        :class:`NonFiniteError`).
        """
        value_only = iteration < self.cfg.critic_warmup_iterations
        total_tokens = exp.response_mask[rows].sum().clamp(min=1)
        stats: dict[str, float] = defaultdict(float)
        ratio_max = 0.0
        for micro_rows in rows.split(micro_batch_size):
            part = exp.select(micro_rows)
            weight = part.response_mask.sum() / total_tokens
            with record_function("ppo/forward_and_loss"):
                loss, micro_stats = self.micro_batch_loss(part, value_only=value_only)
            if not torch.isfinite(loss):
                if self.cfg.on_nonfinite == "error":
                    raise NonFiniteError(
                        f"non-finite loss ({loss.item()}) at PPO iteration {iteration}: policy "
                        f"loss {micro_stats.get('loss/policy')}, value loss "
                        f"{micro_stats['loss/value']}; the last good checkpoint is kept"
                    )
                return None
            with record_function("ppo/backward"):
                backward(loss * weight)
            ratio_max = max(ratio_max, micro_stats.pop("policy/ratio_max", 0.0))
            for key, value in micro_stats.items():
                stats[key] += value * float(weight)
        if not value_only:
            stats["policy/ratio_max"] = ratio_max
        return dict(stats)

    def micro_batch_loss(
        self, part: Experience, value_only: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One forward of the policy gives logprobs, entropy and values; returns the PPO loss.

        ``value_only`` (critic warm-up): ``vf_coef`` x the value loss from
        ``PolicyWithValueHead.values``, which gives no gradient to the policy.
        """
        cfg = self.cfg
        mask = part.response_mask
        P = part.query_ids.shape[1]
        if value_only:
            values = self.policy.values(part.input_ids, part.attention_mask, response_start=P)
            vf_loss, vf = value_loss(values, part.old_values, part.returns, mask, cfg.value_clip)
            loss = cfg.vf_coef * vf_loss
            return loss, {
                "loss/value": float(vf_loss.detach()),
                "loss/total": float(loss.detach()),
                "value/clipfrac": float(vf["clipfrac"]),
            }
        logits, values = self.policy(part.input_ids, part.attention_mask, response_start=P)
        values = values.float()
        T = cfg.generation.temperature
        logprobs = logprobs_from_logits(logits, part.response_ids, T)
        with torch.set_grad_enabled(cfg.ent_coef > 0 and torch.is_grad_enabled()):
            entropy = masked_mean(entropy_from_logits(logits, T), mask)
        pg_loss, pg = ppo_policy_loss(logprobs, part.old_logprobs, part.advantages, mask, cfg.clip)
        vf_loss, vf = value_loss(values, part.old_values, part.returns, mask, cfg.value_clip)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
        if cfg.kl.placement == "loss":
            kl_term = masked_mean(kl_penalty(logprobs, part.ref_logprobs, cfg.kl.estimator), mask)
            loss = loss + float(self.kl_ctl.value) * kl_term
        stats = {
            "loss/policy": float(pg_loss.detach()),
            "loss/value": float(vf_loss.detach()),
            "loss/total": float(loss.detach()),
            "policy/entropy": float(entropy.detach()),
            "policy/clipfrac": float(pg["clipfrac"]),
            "policy/approx_kl": float(pg["approx_kl"]),
            "policy/ratio_mean": float(pg["ratio_mean"]),
            "policy/ratio_max": float(pg["ratio_max"]),
            "value/clipfrac": float(vf["clipfrac"]),
        }
        return loss, stats

    def _rollout_metrics(self, exp, raw_scores, seq_kl, kl_coef) -> dict[str, float]:
        mask = exp.response_mask
        lengths = mask.sum(dim=1).float()
        non_score = -kl_coef * seq_kl if self.cfg.kl.placement == "reward" else 0 * seq_kl
        adv = exp.advantages[mask]
        ret = exp.returns[mask]
        return {
            "objective/score": exp.scores.mean(),
            "objective/raw_score": raw_scores.mean(),
            "objective/rlhf_reward": (exp.scores + non_score).mean(),
            "objective/non_score_reward": non_score.mean(),
            "kl/sequence": seq_kl.mean(),
            "kl/per_token": masked_mean(exp.kl, mask),
            "kl/coef": kl_coef,
            "value/mean": masked_mean(exp.old_values, mask),
            "value/explained_variance": explained_variance(exp.old_values, exp.returns, mask),
            "rollout/advantage_mean": adv.mean(),
            "rollout/advantage_std": adv.std() if adv.numel() > 1 else torch.tensor(0.0),
            "rollout/return_mean": ret.mean(),
            "rollout/return_std": ret.std() if ret.numel() > 1 else torch.tensor(0.0),
            "rollout/response_length": lengths.mean(),
            "rollout/ended_frac": exp.ended.float().mean(),
        }

    # ------------------------------------------------------------------------------------ eval
    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, float] = defaultdict(float)

    def validation_step(self, batch, batch_idx):
        """Sample on held-out prompts (fixed seed, training RNG untouched) and score them."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED + batch_idx + 7919 * self.global_rank)
            rollout = self.sample(batch)
        scores = torch.as_tensor(self.reward(rollout.prompts, rollout.responses)).float()
        T = self.cfg.generation.temperature
        seq_kl = eval_sequence_kl(self.policy.lm, self.ref_lm, rollout, T)
        columns = [rollout.prompts, rollout.responses, scores.tolist()]
        sums = {
            "val/reward": scores.sum(),
            "val/kl": seq_kl.sum(),
            "val/response_length": rollout.response_mask.sum().float(),
            "val/ended_frac": rollout.ended.float().sum(),
        }
        if self.gold_reward is not None:
            gold = torch.as_tensor(self.gold_reward(rollout.prompts, rollout.responses)).float()
            sums["val/gold_score"] = gold.sum()
            columns.append(gold.tolist())
        sums["count"] = torch.tensor(float(len(rollout.prompts)))
        for key, value in sums.items():
            self._val_sums[key] += float(value)
        if batch_idx == 0:
            self._log_samples("val/samples", rollout.prompts, rollout.responses, scores.tolist())
            self.val_samples = list(zip(*columns))

    def on_validation_epoch_end(self) -> None:
        """Means over all eval prompts of all ranks, logged at x = PPO iterations completed."""
        keys = sorted(self._val_sums)
        totals = torch.tensor([self._val_sums[k] for k in keys], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
        totals = dict(zip(keys, totals.tolist()))
        count = totals.pop("count")
        means = {key: value / count for key, value in totals.items()}
        self.log_dict(means, logger=False)  # for callbacks, the progress bar and the task metric
        iterations_done = self.current_epoch + 1 if self.trainer.state.fn == "fit" else 0
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(means, step=iterations_done)

    # ------------------------------------------------------------------------- checkpointing
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rlhf_lightning"] = {
            "kl_controller": self.kl_ctl.state_dict(),
            "nonfinite_skips": self.nonfinite_skips,
            "policy_source": self.policy_source,
            "policy_lora": self.policy_lora,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rlhf_lightning")
        if state is None:
            raise KeyError("checkpoint has no 'rlhf_lightning' state: not written by PPOModule")
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.nonfinite_skips = state["nonfinite_skips"]

    # --------------------------------------------------------------------------------- helpers
    def _clip_gradients(self, optimizer, max_norm: float | None) -> float | None:
        """Clip the global gradient norm of all trained parameters to ``max_norm`` (None: only
        measure it); returns the norm before clipping (None under ``16-mixed``).

        With ``16-mixed`` Lightning's precision plugin unscales the fp16 gradients first, and the
        norm is not reported. In every other precision the gradients are already true
        gradients, and ``clip_grad_norm_`` does it directly (Lightning's bf16-mixed plugin
        refuses to clip for a fused optimizer, although there is nothing to unscale). PPO runs
        under the DDP family only, where every rank holds the full, already averaged gradients,
        so the local norm is the global one.
        """
        if trainer_precision(self) == "16-mixed":
            if max_norm is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm"
                )
            return None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if max_norm is None:
            grads = [p.grad for p in params if p.grad is not None]
            return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _check_finite(self, name: str, values: torch.Tensor, iteration: int) -> None:
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise NonFiniteError(
                f"{bad} non-finite {name} at PPO iteration {iteration}; "
                "the last good checkpoint is kept"
            )

    def _log_samples(self, tag, prompts, responses, scores) -> None:
        logger = self.logger
        if logger is None or self.global_rank != 0 or not hasattr(logger.experiment, "add_text"):
            return
        rows = ["| prompt | response | score |", "|---|---|---|"]
        for prompt, response, score in list(zip(prompts, responses, scores))[:8]:
            cells = [s.replace("|", "\\|").replace("\n", " ") for s in (prompt, response)]
            rows.append(f"| {cells[0]} | {cells[1]} | {score:.3f} |")
        logger.experiment.add_text(tag, "\n".join(rows), self.current_epoch)
