"""PPOModule: PPO and its family (REINFORCE, A2C, RLOO, GRPO, ...) as a LightningModule with
manual optimization.

One Lightning **epoch** is one iteration: the train dataloader yields exactly one batch of
prompts per epoch (``RolloutSampler``), and :meth:`training_step` on it reads top to bottom:

1. **sample** -- ``samples_per_prompt`` responses per prompt from the current policy (KV cache,
   temperature T, no top-k/top-p by default), truncated after the first stop token;
2. **score** -- the reward source's score per response;
3. **experience** -- old logprobs and values (one policy forward), reference logprobs (one
   forward of the frozen reference), per-token rewards, advantages from the algorithm's
   estimator, whitened over the batch of all ranks if configured (:mod:`..rollout.experience`);
4. **update** -- ``epochs`` x shuffled minibatches x micro-batches of ``loss, stats =
   self.loss(...)`` -> one optimizer and LR-scheduler step per minibatch; the epoch loop stops
   early when the approx KL exceeds ``target_kl``;
5. **KL controller update** and **log** -- everything, namespaced (``objective/``, ``kl/``,
   ``policy/``, ``value/``, ``loss/``, ``optim/``, ``lr/``, ``rollout/``, ``time/``, ``perf/``),
   reduced exactly over all ranks (:class:`~rlhf_lightning.stats.Stats`).

The choices are components of ``cfg.algorithm`` (see ``conf/algorithm/``): the advantage
estimator, the policy loss, the loss aggregation (whose denominators count the whole minibatch
on all ranks, so micro-batches and ranks give the same update as one big batch), the value
model, the optimizer, and where the KL goes (``algorithm.kl.placement``).

The first ``value_model.warmup_iterations`` iterations train the value function alone: the
same loss with the policy terms weighted 0 and the value head on a detached trunk (every
parameter still gets a (zero) gradient, as DDP requires); the policy's gradients are dropped
before the step, so AdamW leaves the policy and its state untouched, and an adaptive KL
controller is left alone.

Counters: ``trainer.current_epoch`` counts iterations; ``trainer.global_step`` counts optimizer
steps (``epochs * rollout_batch_size / minibatch_size`` per iteration, fewer when ``target_kl``
stops an epoch loop early). The TensorBoard x-axis of ``train`` metrics is the iteration.

Departures from the N+ reproduction (Huang et al. 2024), all configurable: the defaults sample at
temperature 0.7 (not 1.0) and use small CPU-sized batches.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import lightning as L
import torch
from torch.profiler import record_function

from rlhf_lightning.config import RLConfig
from rlhf_lightning.errors import CheckpointError, UserError
from rlhf_lightning.evaluation import sequence_kl as eval_sequence_kl
from rlhf_lightning.hardware import resolve_sampling_dtype
from rlhf_lightning.kl import kl_penalty
from rlhf_lightning.losses import aggregate, explained_variance, value_loss
from rlhf_lightning.ops import entropy_from_logits, logprobs_from_logits, zero_masked
from rlhf_lightning.optim import trainer_precision
from rlhf_lightning.rewards import RewardError
from rlhf_lightning.rollout.experience import Experience, make_experience, sequence_kl
from rlhf_lightning.rollout.generation import (
    Rollout,
    resolve_stop_token_ids,
    sample_responses,
    sampling_copy,
)
from rlhf_lightning.schedules import warmup_decay_lambda
from rlhf_lightning.stats import Stats, all_ranks_sum, any_rank, world_size
from rlhf_lightning.strategies import gathered_weights, global_grad_norm, is_sharded, shard_policy
from rlhf_lightning.tracking import log_samples

EVAL_SEED = 1234


class NonFiniteError(UserError, FloatingPointError):
    """A NaN or inf in a quantity PPO depends on."""


class PPOModule(L.LightningModule):
    """Policy optimisation of a causal LM against a reward source.

    Args:
        policy: ``PolicyWithValueHead`` (its value head may be absent); its ``lm`` samples and
            is trained.
        ref_lm: the frozen reference LM (same tokenizer, the policy's dtype). It is kept out of
            the module's ``state_dict`` and optimizer: it is rebuilt from config on resume.
        tokenizer: the policy tokenizer (left padding).
        reward: a reward source, ``reward(prompts, responses) -> (B,)``.
        cfg: the validated run config (algorithm, budget, generation, cadence).
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
        cfg: RLConfig,
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
        self.phase: str | None = None  # what the module is doing now (the progress line shows it)
        self.phase_seconds: dict[str, float] = {}
        # (prompt, response, reward[, gold]) of the first eval batch of the latest eval.
        self.val_samples: list[tuple] = []
        # {prompt, reward[, gold_score]} of each eval prompt of this rank in the latest eval.
        self.val_scores: list[dict] = []

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

    def configure_model(self) -> None:
        """Under ``FSDP2Strategy`` (a device mesh is set): shard the policy and a separate
        frozen reference over the data-parallel ranks (``strategies.shard_policy``). Lightning
        calls it before every fit / validate; the second call finds the policy sharded."""
        if self._device_mesh is None or is_sharded(self.policy):
            return
        shard_policy(
            self.policy, self.ref_lm, self._device_mesh["data_parallel"], trainer_precision(self)
        )

    def full_weights(self, sampling: bool = False):
        """Context: the sharded policy's LM callable on its own (sampling, a LoRA reference,
        the eval KL); with ``sampling`` and ``rollout_gather=full`` every block is gathered once
        for the whole rollout (``strategies.gathered_weights``). A no-op unless sharded."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        every_unit = sampling and getattr(strategy, "rollout_gather", "full") == "full"
        return gathered_weights(self.policy, every_unit)

    def on_validation_start(self) -> None:  # also runs for trainer.validate() before fit
        self.place_frozen_models()

    def configure_optimizers(self):
        alg = self.cfg.algorithm
        policy_params, value_params = [], []
        for name, param in self.policy.named_parameters():
            if param.requires_grad:
                (policy_params if name.startswith("lm.") else value_params).append(param)
        groups = [{"params": policy_params, "name": "policy"}]
        if value_params:
            groups.append({"params": value_params, "lr": alg.value_model.lr, "name": "value"})
        # Lightning's fp16 GradScaler path cannot clip gradients of a fused optimizer.
        no_fused = {"fused": False} if trainer_precision(self) == "16-mixed" else {}
        optimizer = alg.optimizer(groups, **no_fused)
        total = self.cfg.budget.num_iterations * self.cfg.optimizer_steps_per_iteration
        schedule = warmup_decay_lambda(
            total_steps=total, warmup_steps=int(alg.warmup_ratio * total), decay=alg.lr_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        iteration = self.current_epoch
        torch.manual_seed(self.iteration_seed(iteration))
        self.phase_seconds = {}
        with self.running("sampling"), self.full_weights(sampling=True):
            rollout = self.sample(batch, self.cfg.algorithm.samples_per_prompt)
        with self.running("scoring"):
            scores = self.score(rollout, batch, iteration)
        kl_coef = float(self.kl_ctl.value)
        with self.running("experience"), self.full_weights():
            exp = self.make_experience(rollout, scores, kl_coef, iteration)
        with self.running("update"):
            stats = self.update(exp, iteration)
        stats.merge(self.rollout_stats(exp, rollout, scores, kl_coef))
        metrics = stats.reduce()
        if iteration >= self.cfg.algorithm.value_warmup_iterations:  # the policy moved
            self.kl_ctl.update(metrics["kl/sequence"], len(exp) * world_size())
        self.log_iteration(metrics, exp, iteration)

    @contextmanager
    def running(self, phase: str):
        """Mark ``phase`` as running (``self.phase``, a profiler label) and time it."""
        self.phase = phase
        start = time.perf_counter()
        with record_function(f"ppo/{phase}"):  # labels for torch.profiler; free without one
            yield
        self.phase_seconds[phase] = time.perf_counter() - start

    def sampling_lm(self):
        """The LM that samples rollouts: the policy's, or its ``generation.sampling_dtype`` copy
        (refreshed from the policy here, so it always holds the current weights)."""
        dtype = resolve_sampling_dtype(self.cfg.generation.sampling_dtype, self.device.type)
        if dtype is None:
            return self.policy.lm
        previous = self._frozen.get("sampler")
        self._frozen["sampler"] = sampling_copy(self.policy.lm, getattr(torch, dtype), previous)
        return self._frozen["sampler"]

    def sample(self, batch: dict, samples_per_prompt: int = 1) -> Rollout:
        """``samples_per_prompt`` responses per prompt of a ``PromptDataModule`` batch, from the
        current policy; the samples of a prompt are adjacent rows (group by group)."""
        k = samples_per_prompt
        was_training = self.policy.training
        self.policy.eval()
        lm = self.sampling_lm()
        rollout = sample_responses(
            lm,
            self.tokenizer,
            batch["input_ids"].repeat_interleave(k, dim=0),
            batch["attention_mask"].repeat_interleave(k, dim=0),
            [prompt for prompt in batch["prompts"] for _ in range(k)],
            self.cfg.generation,
            self.stop_token_ids,
            keep_hidden=self.values_from_generation(lm),
        )
        self.policy.train(was_training)
        return rollout

    def values_from_generation(self, lm) -> bool:
        """Whether generation's hidden states give the values: old logprobs from the sampler, a
        value head on the shared trunk, and rollouts sampled with the trained weights."""
        policy = self.policy
        return (
            self.cfg.algorithm.old_logprobs == "sampler"
            and policy.value_head is not None
            and policy.critic_backbone is None
            and lm is policy.lm
        )

    def score(self, rollout: Rollout, batch: dict, iteration: int) -> torch.Tensor:
        """(B,) float32 scores of the reward source on this rank's rollouts, checked on all ranks
        together: an error or a non-finite score on one rank stops every rank."""
        error = None
        try:
            scores = self.reward(rollout.prompts, rollout.responses, **columns_of(batch, rollout))
            scores = torch.as_tensor(scores).float().to(self.device)
            bad = int((~torch.isfinite(scores)).sum())
            if bad:
                error = f"{bad} non-finite reward scores"
        except UserError as raised:
            error, scores = str(raised), None
        if any_rank(error is not None):
            raise RewardError(
                f"at iteration {iteration}: {error or 'the reward failed on another rank'}; "
                "the last good checkpoint is kept"
            )
        return scores

    def make_experience(self, rollout, scores, kl_coef: float, iteration: int) -> Experience:
        exp = make_experience(self.policy, self.ref_lm, rollout, scores, self.cfg, kl_coef)
        mask = exp.response_mask
        for name in ("old_logprobs", "ref_logprobs", "old_values"):
            self.check_finite(name.replace("_", " "), getattr(exp, name)[mask], iteration)
        return exp

    def update(self, exp: Experience, iteration: int) -> Stats:
        """``epochs`` x shuffled minibatches x micro-batches; one optimizer step per minibatch
        (of the value function alone in warm-up)."""
        alg, budget = self.cfg.algorithm, self.cfg.budget
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        warmup = iteration < alg.value_warmup_iterations
        self.policy.train()
        stats = Stats()
        epochs_done = 0
        while epochs_done < alg.epochs:
            epoch_stats = Stats()
            for rows in torch.randperm(len(exp)).split(budget.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                if self.minibatch_backward(exp, rows, warmup, epoch_stats, iteration):
                    self.optimizer_step(optimizer, epoch_stats, warmup)
                    scheduler.step()
            stats.merge(epoch_stats)
            epochs_done += 1
            if self.kl_early_stop(epoch_stats, warmup):
                break
        stats.add("policy/epochs", epochs_done / world_size(), 1.0 / world_size())
        self.policy.eval()
        return stats

    def kl_early_stop(self, epoch_stats: Stats, warmup: bool) -> bool:
        """Whether the epoch's mean approx KL (all ranks) exceeds ``target_kl``."""
        target = self.cfg.algorithm.target_kl
        if target is None or warmup:
            return False
        return epoch_stats.reduce()["policy/approx_kl"] > target

    def minibatch_backward(
        self, exp: Experience, rows: torch.Tensor, warmup: bool, stats: Stats, iteration: int
    ) -> bool:
        """Accumulate the gradient of one minibatch (``rows``) in micro-batches; False when its
        loss was non-finite on some rank and ``on_nonfinite=skip`` (``error`` raises)."""
        agg = self.cfg.algorithm.loss_aggregation
        denominator = all_ranks_sum(agg.units(exp.response_mask[rows])).clamp(min=1).float()
        world = world_size()
        losses = Stats()
        finite = True
        for part in exp.micro_batches(rows, self.cfg.budget.micro_batch_size):
            with record_function("ppo/forward_and_loss"):
                loss, terms = self.loss(part, denominator, warmup, stats)
            finite = finite and bool(torch.isfinite(loss))
            with record_function("ppo/backward"):
                self.backward_(loss * world)  # DDP averages gradients over ranks
            for name, value in terms.items():
                losses.add(f"loss/{name}", value, 0.0)
            self.count_padding(part, exp, stats)
        if any_rank(not finite):
            if self.cfg.algorithm.on_nonfinite == "error":
                raise NonFiniteError(
                    f"non-finite loss at iteration {iteration} (on at least one rank: "
                    f"{'this one' if not finite else 'another'}); the last good checkpoint is kept"
                )
            self.nonfinite_skips += 1
            return False
        for name in losses.sums:  # each rank holds part of the minibatch's loss
            stats.add(name, losses.sums[name], 1.0 / world)
        return True

    @staticmethod
    def count_padding(part: Experience, exp: Experience, stats: Stats) -> None:
        """The share of padded positions a micro-batch's forward runs on (``perf/padding_frac``)
        and what it would be without length grouping and trimming, at the rollout batch's full
        width (``perf/padding_frac_untrimmed``)."""
        real = float(part.attention_mask.sum())
        rows = len(part)
        stats.add(
            "perf/padding_frac", rows * part.input_ids.shape[1] - real, part.input_ids.numel()
        )
        full = rows * exp.input_ids.shape[1]
        stats.add("perf/padding_frac_untrimmed", full - real, full)

    def backward_(self, loss: torch.Tensor) -> None:
        """``manual_backward`` under a Trainer (precision, strategy); plain backward outside."""
        if self._trainer is None:
            loss.backward()
        else:
            self.manual_backward(loss)

    def loss(
        self, part: Experience, denominator: torch.Tensor, warmup: bool, stats: Stats
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch: its share of the minibatch's aggregated loss.

        One forward of the policy gives logprobs, entropy and values. In warm-up the policy
        terms are weighted 0 and the value head reads a detached trunk. Adds the micro-batch's
        token statistics to ``stats``; returns the loss and its terms (floats).
        """
        alg = self.cfg.algorithm
        mask = part.response_mask
        T = self.cfg.generation.temperature
        logits, values = self.policy(
            part.input_ids,
            part.attention_mask,
            response_start=part.prompt_len,
            value_trains_trunk=not warmup,
        )
        logprobs = logprobs_from_logits(logits, part.response_ids, T)
        weights = alg.loss_aggregation.token_weights(mask)
        policy_tokens, diagnostics = alg.policy_loss(
            logprobs, part.old_logprobs, part.advantages, mask
        )
        if alg.sampler_correction is not None:
            is_weights, _ = alg.sampler_correction(part.old_logprobs, part.sampler_logprobs, mask)
            policy_tokens = policy_tokens * is_weights
        with torch.set_grad_enabled(alg.ent_coef > 0 and torch.is_grad_enabled()):
            entropy = zero_masked(entropy_from_logits(logits, T), mask)
        terms = {
            "policy": aggregate(policy_tokens, weights, denominator),
            "entropy": aggregate(entropy, weights, denominator),
        }
        kl_coef = alg.kl.loss_coef(float(self.kl_ctl.value))
        if kl_coef:
            kl = kl_penalty(zero_masked(logprobs, mask), part.ref_logprobs, alg.kl.estimator)
            terms["kl"] = aggregate(zero_masked(kl, mask), weights, denominator)
        policy_weight = 0.0 if warmup else 1.0
        loss = policy_weight * (
            terms["policy"] - alg.ent_coef * terms["entropy"] + kl_coef * terms.get("kl", 0.0)
        )
        if values is not None:
            value_tokens, value_clipped = value_loss(
                values.float(), part.old_values, part.returns, mask, alg.value_model.clip
            )
            terms["value"] = aggregate(value_tokens, weights, denominator)
            loss = loss + alg.value_model.coef * terms["value"]
            stats.add("value/clipfrac", value_clipped.sum(), mask.sum())
        terms["total"] = loss
        tokens = mask.sum()
        stats.add("policy/entropy", entropy.detach().sum(), tokens)
        if not warmup:
            stats.add("policy/clipfrac", diagnostics["clipped"].sum(), tokens)
            stats.add("policy/approx_kl", 0.5 * (diagnostics["log_ratio"] ** 2).sum(), tokens)
            stats.add("policy/ratio_mean", diagnostics["ratio"].sum(), tokens)
            stats.add_max("policy/ratio_max", diagnostics["ratio"][mask].max())
        return loss, {name: float(value.detach()) for name, value in terms.items()}

    def optimizer_step(self, optimizer, stats: Stats, warmup: bool) -> None:
        """Clip, step; in warm-up the policy's (zero) gradients are dropped first, so AdamW
        leaves the policy and its moments untouched."""
        if warmup:
            for param in self.policy.lm.parameters():
                param.grad = None
        with record_function("ppo/clip_gradients"):
            grad_norm = self.clip_gradients_(optimizer, self.cfg.algorithm.max_grad_norm)
        if grad_norm is not None:
            stats.add("optim/grad_norm", grad_norm / world_size(), 1.0 / world_size())
            clipped = self.cfg.algorithm.max_grad_norm is not None and (
                grad_norm > self.cfg.algorithm.max_grad_norm
            )
            stats.add("optim/clipped_frac", float(clipped) / world_size(), 1.0 / world_size())
        optimizer.step()

    # -------------------------------------------------------------------------------- metrics
    def rollout_stats(self, exp: Experience, rollout: Rollout, raw_scores, kl_coef) -> Stats:
        """The rollout batch's statistics (sums over this rank's rows)."""
        alg = self.cfg.algorithm
        stats = Stats()
        mask = exp.response_mask
        seq_kl = sequence_kl(exp)
        non_score = -alg.kl.reward_coef(kl_coef) * seq_kl
        stats.add_mean("objective/score", exp.scores)
        stats.add_mean("objective/raw_score", raw_scores)
        stats.add_mean("objective/rlhf_reward", exp.scores + non_score)
        stats.add_mean("objective/non_score_reward", non_score)
        stats.add_mean("kl/sequence", seq_kl)
        stats.add_mean("kl/per_token", exp.kl[mask])
        stats.add_mean("rollout/response_length", mask.sum(dim=1).float())
        stats.add_mean("rollout/ended_frac", exp.ended.float())
        for name, values in (("advantage", exp.advantages), ("return", exp.returns)):
            stats.add_mean(f"rollout/{name}_mean", values[mask])
            stats.add_mean(f"rollout/{name}_sq", values[mask] ** 2)
        if alg.value_model.present:
            stats.add_mean("value/mean", exp.old_values[mask])
            stats.add(
                "value/explained_variance",
                explained_variance(exp.old_values, exp.returns, mask) / world_size(),
                1.0 / world_size(),
            )
        if rollout.sampler_logprobs is not None and alg.old_logprobs == "recompute":
            # How far the distribution sampled from is from the one the losses use (k1 over the
            # sampled tokens): ~0 unless top-k/top-p, min_new_tokens or a lower-precision
            # sampling copy reshape it.
            sampler = rollout.sampler_logprobs.to(mask.device)
            gap = (sampler - exp.old_logprobs)[mask]
            stats.add_mean("rollout/sampler_kl", gap)
            stats.add_max("rollout/sampler_logprob_max_abs_diff", gap.abs().max())
            ratio = torch.exp(exp.old_logprobs - sampler)[mask]
            stats.add_max("rollout/is_ratio_max", ratio.max())
            if alg.sampler_correction is not None:
                weights, cut = alg.sampler_correction(exp.old_logprobs, sampler, mask)
                stats.add_mean("rollout/is_weight_mean", weights[mask])
                stats.add_mean("rollout/is_cut_frac", cut[mask].float())
        return stats

    def log_iteration(self, metrics: dict[str, float], exp: Experience, iteration: int) -> None:
        """Log an iteration's metrics (already reduced over ranks) and, now and then, samples."""
        for name in ("advantage", "return"):
            mean, sq = metrics.pop(f"rollout/{name}_mean"), metrics.pop(f"rollout/{name}_sq")
            metrics[f"rollout/{name}_mean"] = mean
            metrics[f"rollout/{name}_std"] = max(sq - mean**2, 0.0) ** 0.5
        seconds = self.phase_seconds
        tokens = float(exp.response_mask.sum()) * world_size()
        metrics.update({f"time/{phase}": s for phase, s in seconds.items()})
        metrics["time/iteration"] = sum(seconds.values())
        metrics["kl/coef"] = float(self.kl_ctl.value)
        metrics["perf/generated_tokens_per_s"] = tokens / max(seconds["sampling"], 1e-9)
        metrics["perf/trained_tokens_per_s"] = (
            tokens * metrics.get("policy/epochs", 1.0) / max(seconds["update"], 1e-9)
        )
        metrics["perf/nonfinite_skips"] = float(self.nonfinite_skips)
        for group in self.optimizers().param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
        metrics["value/warmup"] = float(iteration < self.cfg.algorithm.value_warmup_iterations)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(exp))
        every = self.cfg.cadence.sample_table_every
        if every and (iteration + 1) % every == 0:
            kl = sequence_kl(exp).tolist()
            self.log_samples("train/samples", exp.prompts, exp.responses, exp.scores.tolist(), kl)

    # ------------------------------------------------------------------------------------ eval
    def on_validation_epoch_start(self) -> None:
        self.phase = "eval"
        self._val_stats = Stats()
        self.val_scores = []

    def validation_step(self, batch, batch_idx):
        """Sample on held-out prompts (fixed seed, training RNG untouched) and score them."""
        with torch.random.fork_rng(devices=[]), self.full_weights(sampling=True):
            torch.manual_seed(EVAL_SEED + batch_idx + 7919 * self.global_rank)
            rollout = self.sample(batch)
        columns = columns_of(batch, rollout)
        scores = torch.as_tensor(self.reward(rollout.prompts, rollout.responses, **columns))
        T = self.cfg.generation.temperature
        with self.full_weights():
            seq_kl = eval_sequence_kl(self.policy.lm, self.ref_lm, rollout, T)
        gold = None
        stats = self._val_stats
        stats.add_mean("val/reward", scores)
        stats.add_mean("val/kl", seq_kl)
        stats.add_mean("val/response_length", rollout.response_mask.sum(dim=1).float())
        stats.add_mean("val/ended_frac", rollout.ended.float())
        if self.gold_reward is not None:
            gold = torch.as_tensor(self.gold_reward(rollout.prompts, rollout.responses, **columns))
            stats.add_mean("val/gold_score", gold)
        for i, prompt in enumerate(rollout.prompts):
            row = {"prompt": prompt, "reward": scores[i].item()}
            if gold is not None:
                row["gold_score"] = gold[i].item()
            self.val_scores.append(row)
        if batch_idx == 0:
            self.log_samples(
                "val/samples",
                rollout.prompts,
                rollout.responses,
                scores.tolist(),
                seq_kl.tolist(),
                None if gold is None else gold.tolist(),
            )
            columns = [rollout.prompts, rollout.responses, scores.tolist()]
            if gold is not None:
                columns.append(gold.tolist())
            self.val_samples = list(zip(*columns))

    def on_validation_epoch_end(self) -> None:
        """Means over all eval prompts of all ranks, logged at x = iterations completed."""
        means = self._val_stats.reduce()
        self.log_dict(means, logger=False)  # for callbacks, the progress line and the task metric
        iterations_done = self.current_epoch + 1 if self.trainer.state.fn == "fit" else 0
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(means, step=iterations_done)
        self.phase = None

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
            raise CheckpointError(
                "checkpoint has no 'rlhf_lightning' state: not written by PPOModule"
            )
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.nonfinite_skips = state["nonfinite_skips"]

    # --------------------------------------------------------------------------------- helpers
    def clip_gradients_(self, optimizer, max_norm: float | None) -> float | None:
        """Clip the global gradient norm of all trained parameters to ``max_norm`` (None: only
        measure it); returns the norm before clipping (None under ``16-mixed``).

        With ``16-mixed`` Lightning's precision plugin unscales the fp16 gradients first, and the
        norm is not reported. In every other precision the gradients are already true
        gradients, clipped here directly (Lightning's bf16-mixed plugin
        refuses to clip for a fused optimizer, although there is nothing to unscale). Under the
        DDP family every rank holds the full, already averaged gradients, so the local norm is
        the global one; under FSDP2 each rank holds a shard of them and the norm is reduced over
        the ranks (``strategies.global_grad_norm``).
        """
        if trainer_precision(self) == "16-mixed":
            if max_norm is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm"
                )
            return None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = global_grad_norm([p.grad for p in params if p.grad is not None])
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def check_finite(self, name: str, values: torch.Tensor, iteration: int) -> None:
        """Raise :class:`NonFiniteError` on every rank when ``values`` is not finite on one."""
        bad = int((~torch.isfinite(values)).sum())
        if any_rank(bad > 0):
            where = f"{bad} non-finite {name}" if bad else f"non-finite {name} on another rank"
            raise NonFiniteError(
                f"{where} at iteration {iteration}; the last good checkpoint is kept"
            )

    def log_samples(self, tag, prompts, responses, scores, kl, gold=None) -> None:
        """The first 8 samples (prompt, response, score, KL[, gold]) to every logger: a table
        where the logger has one, else JSON lines (``tracking.log_samples``)."""
        columns = {"prompt": prompts, "response": responses, "score": scores, "kl": kl}
        if gold is not None:
            columns["gold"] = gold
        rows = [dict(zip(columns, values)) for values in list(zip(*columns.values()))[:8]]
        for logger in self.loggers:
            log_samples(logger, tag, rows, self.current_epoch)


def columns_of(batch: dict, rollout: Rollout) -> dict[str, list]:
    """The prompt rows' other columns (``batch["columns"]``), one value per rollout: repeated
    for the samples of a prompt, as the rollout repeats the prompt."""
    k = len(rollout.prompts) // len(batch["prompts"])
    return {
        name: [value for value in values for _ in range(k)]
        for name, values in (batch.get("columns") or {}).items()
    }
