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
4. **update** -- ``epochs`` x shuffled minibatches x micro-batches: forward, objective
   (:class:`~rlhf_lightning.objective.Objective`: the loss terms and their metrics), backward;
   one optimizer and LR-scheduler step per minibatch; the epoch loop stops early when the
   approx KL exceeds ``target_kl``;
5. **KL controller update** and **log** -- everything, namespaced (``objective/``, ``kl/``,
   ``policy/``, ``value/``, ``optim/``, ``rollout/``, ``time/``, ``perf/``),
   reduced exactly over all ranks (:class:`~rlhf_lightning.stats.Stats`).

The choices are components of ``cfg.algorithm`` (see ``conf/algorithm/``): the advantage
estimator, the policy loss, the loss aggregation (whose denominators count the whole minibatch
on all ranks, so micro-batches and ranks give the same update as one big batch), the value
model, the optimizer, and the KL penalty (``algorithm.kl``: a term in the rewards and/or one in
the loss, its controllers' coefficients the run's state).

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
from rlhf_lightning.errors import CheckpointError, NonFiniteError, UserError
from rlhf_lightning.hardware import resolve_sampling_dtype
from rlhf_lightning.kl import sequence_kl
from rlhf_lightning.losses import explained_variance
from rlhf_lightning.objective import Objective
from rlhf_lightning.optim import trainer_precision
from rlhf_lightning.rewards import RewardError
from rlhf_lightning.rollout.experience import Experience, make_experience, response_logprobs
from rlhf_lightning.rollout.generation import (
    Rollout,
    concat_rollouts,
    resolve_stop_token_ids,
    sample_responses,
    sampling_copy,
    select_rows,
)
from rlhf_lightning.samples import log_samples
from rlhf_lightning.stats import Stats, agreed_error, all_ranks_sum, any_rank, world_size
from rlhf_lightning.strategies import gathered_weights, global_grad_norm, is_sharded, shard_policy

EVAL_SEED = 1234


class PPOModule(L.LightningModule):
    """Policy optimisation of a causal LM against a reward source.

    Args:
        policy: ``PolicyWithValueHead`` (its value head may be absent); its ``lm`` samples and
            is trained.
        ref_lm: the frozen reference LM (same tokenizer, the policy's dtype). It is kept out of
            the module's ``state_dict`` and optimizer: it is rebuilt from config on resume.
        tokenizer: the policy tokenizer (left padding).
        reward: a reward source, ``reward(prompts, responses) -> (B,)``.
        cfg: the validated run config (algorithm, budget, generation, cadence); its KL penalty
            (``cfg.algorithm.kl``, built once with its controllers) is the module's to update
            and checkpoint.
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
        self.cfg = cfg  # also builds self.objective
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

    @property
    def cfg(self) -> RLConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: RLConfig) -> None:
        """The run's config, and the objective built from it."""
        self._cfg = cfg
        self.objective = Objective(cfg.algorithm, cfg.generation.temperature)

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
        scheduler = alg.lr_schedule(optimizer, total)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        iteration = self.current_epoch
        torch.manual_seed(self.iteration_seed(iteration))
        self.phase_seconds = {}
        rollout, scores, sampling_stats = self.collect(batch, iteration)
        kl = self.cfg.algorithm.kl
        reward_kl_coef = kl.reward_coef  # the rewards' beta this iteration
        with self.running("experience"), self.full_weights():
            exp = self.make_experience(rollout, scores, iteration)
        with self.running("update"):
            stats = self.update(exp, iteration)
        stats.merge(self.rollout_stats(exp, rollout, scores, reward_kl_coef))
        stats.merge(sampling_stats)
        metrics = stats.reduce()
        if iteration >= self.cfg.algorithm.value_warmup_iterations:  # the policy moved
            kl.update(metrics["kl/sequence"], len(exp) * world_size())
        self.log_iteration(metrics, exp, iteration)

    @contextmanager
    def running(self, phase: str):
        """Mark ``phase`` as running (``self.phase``, a profiler label) and time it."""
        self.phase = phase
        start = time.perf_counter()
        with record_function(f"ppo/{phase}"):  # labels for torch.profiler; free without one
            yield
        elapsed = time.perf_counter() - start
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + elapsed

    def collect(self, batch: dict, iteration: int) -> tuple[Rollout, torch.Tensor, Stats]:
        """Sample and score this iteration's rollouts: ``samples_per_prompt`` per prompt.

        With ``algorithm.dynamic_sampling`` (DAPO) the batch holds ``max_rounds`` rounds of
        ``prompts_per_iteration`` prompts: a round's groups whose scores are all equal are set
        aside, and rounds go on while any rank is short of ``prompts_per_iteration`` informative
        groups (every rank samples every round, so the ranks stay in step); a rank still short
        after the last round fills up with set-aside groups, so each rank's batch keeps its
        size. Returns the rollouts, their (B,) scores and the sampling statistics.
        """
        alg, stats = self.cfg.algorithm, Stats()
        k, wanted = alg.samples_per_prompt, self.cfg.prompts_per_iteration
        kept: list[tuple[Rollout, torch.Tensor]] = []  # one group each
        set_aside: list[tuple[Rollout, torch.Tensor]] = []
        rounds = split_prompts(batch, wanted)
        for done, prompts in enumerate(rounds, start=1):
            with self.running("sampling"), self.full_weights(sampling=True):
                rollout = self.sample(prompts, k)
            with self.running("scoring"):
                scores = self.score(rollout, prompts, iteration)
            if alg.dynamic_sampling is None:
                return rollout, scores, stats
            for g, group_scores in enumerate(scores.view(-1, k)):
                group = (select_rows(rollout, list(range(g * k, g * k + k))), group_scores)
                informative = bool(group_scores.max() > group_scores.min())
                (kept if informative else set_aside).append(group)
            if done == len(rounds) or not any_rank(len(kept) < wanted):
                break
        sampled = len(kept) + len(set_aside)
        stats.add_mean("rollout/sampling_rounds", torch.tensor([float(done)]))
        stats.add("rollout/informative_groups_frac", len(kept), sampled)
        stats.add("rollout/filled_groups", max(wanted - len(kept), 0), 1)
        groups = (kept + set_aside)[:wanted]
        rollout = concat_rollouts([g for g, _ in groups], self.tokenizer.pad_token_id)
        return rollout, torch.cat([s for _, s in groups]), stats

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
        together: an error or a non-finite score on one rank stops every rank, with the same
        message."""
        scores, error = scores_or_error(self.reward, rollout, batch)
        agreed = agreed_error(error)
        if agreed is not None:
            raise RewardError(
                f"at iteration {iteration}: {agreed}; the last good checkpoint is kept"
            )
        return scores.to(self.device)

    def make_experience(self, rollout, scores, iteration: int) -> Experience:
        exp = make_experience(self.policy, self.ref_lm, rollout, scores, self.cfg)
        mask = exp.response_mask
        for name in ("old_logprobs", "ref_logprobs", "old_values"):
            self.check_finite(name.replace("_", " "), getattr(exp, name)[mask], iteration)
        return exp

    def update(self, exp: Experience, iteration: int) -> Stats:
        """``epochs`` passes over the rollout batch, each in shuffled minibatches: the gradient of
        a minibatch (:meth:`minibatch_backward`), then one optimizer and LR-scheduler step; the
        passes stop early once an epoch's mean approx KL exceeds ``target_kl``. In the value
        warm-up only the value function moves."""
        alg, budget = self.cfg.algorithm, self.cfg.budget
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        warmup = iteration < alg.value_warmup_iterations
        stats = Stats()
        self.policy.train()
        epochs_done = 0
        while epochs_done < alg.epochs:
            epoch_stats = Stats()
            for rows in torch.randperm(len(exp)).split(budget.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                minibatch_stats = self.minibatch_backward(exp, rows, warmup, iteration)
                if minibatch_stats is None:  # a non-finite loss, skipped
                    continue
                epoch_stats.merge(minibatch_stats)
                epoch_stats.merge(self.optimizer_step(optimizer, warmup))
                scheduler.step()
            stats.merge(epoch_stats)
            epochs_done += 1
            target = alg.target_kl
            if (
                target is not None
                and not warmup
                and epoch_stats.reduce()["policy/approx_kl"] > target
            ):
                break  # every rank reduced the same statistics: all stop together
        stats.add("policy/epochs", epochs_done / world_size(), 1.0 / world_size())
        self.policy.eval()
        return stats

    def minibatch_backward(
        self, exp: Experience, rows: torch.Tensor, warmup: bool, iteration: int
    ) -> Stats | None:
        """Accumulate the gradient of the minibatch ``rows`` micro-batch by micro-batch: forward,
        objective, backward. Returns its metrics, or None when its loss was non-finite on some
        rank and ``on_nonfinite=skip`` (``error`` raises, on every rank)."""
        alg, world = self.cfg.algorithm, world_size()
        units = alg.loss_aggregation.units(exp.loss_mask[rows])
        denominator = all_ranks_sum(units).clamp(min=1).float()
        stats, finite = Stats(), True
        for part in exp.micro_batches(rows, self.cfg.budget.micro_batch_size):
            with record_function("ppo/forward_and_loss"):
                logits, values = self.policy(
                    part.input_ids,
                    part.attention_mask,
                    response_start=part.prompt_len,
                    value_trains_trunk=not warmup,
                )
                loss, metrics = self.objective(logits, values, part, denominator, warmup)
            finite = finite and bool(torch.isfinite(loss))
            with record_function("ppo/backward"):
                backward(self, loss * world)  # DDP averages gradients over ranks
            stats.merge(metrics)
            stats.merge(padding_stats(part, exp))
        if any_rank(not finite):
            if alg.on_nonfinite == "error":
                agreed = agreed_error(None if finite else "non-finite loss")
                raise NonFiniteError(
                    f"{agreed} at iteration {iteration}; the last good checkpoint is kept"
                )
            self.nonfinite_skips += 1
            return None
        return stats

    def optimizer_step(self, optimizer, warmup: bool) -> Stats:
        """Clip the global gradient norm, step; in warm-up the policy's (zero) gradients are
        dropped first, so AdamW leaves the policy and its moments untouched. Returns the norm
        statistics (``optim/*``)."""
        if warmup:
            for param in self.policy.lm.parameters():
                param.grad = None
        max_norm = self.cfg.algorithm.max_grad_norm
        with record_function("ppo/clip_gradients"):
            grad_norm = clip_gradients(self, optimizer, max_norm)
        stats = Stats()
        if grad_norm is not None:
            world = world_size()
            stats.add("optim/grad_norm", grad_norm / world, 1.0 / world)
            clipped = max_norm is not None and grad_norm > max_norm
            stats.add("optim/clipped_frac", float(clipped) / world, 1.0 / world)
        optimizer.step()
        return stats

    # -------------------------------------------------------------------------------- metrics
    def rollout_stats(self, exp: Experience, rollout: Rollout, raw_scores, kl_coef) -> Stats:
        """The rollout batch's statistics (sums over this rank's rows); ``kl_coef``: the beta of
        the KL in the rewards when they were made (``-beta * KL`` is the non-score reward)."""
        alg = self.cfg.algorithm
        stats = Stats()
        mask = exp.response_mask
        seq_kl = sequence_kl(exp.old_logprobs, exp.ref_logprobs, exp.response_mask)
        non_score = -kl_coef * seq_kl
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
            explained = explained_variance(exp.old_values, exp.returns, mask)
            if torch.isfinite(explained):  # undefined where the returns do not vary: not logged
                stats.add("value/explained_variance", explained / world_size(), 1 / world_size())
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
        kl = self.cfg.algorithm.kl
        if kl.reward is not None:
            metrics["kl/coef"] = kl.reward.coef
        if kl.loss is not None:
            metrics["kl/loss_coef"] = kl.loss.coef
        metrics["perf/generated_tokens_per_s"] = tokens / max(seconds["sampling"], 1e-9)
        metrics["perf/trained_tokens_per_s"] = (
            tokens * metrics.get("policy/epochs", 1.0) / max(seconds["update"], 1e-9)
        )
        metrics["perf/nonfinite_skips"] = float(self.nonfinite_skips)
        for group in self.optimizers().param_groups:
            metrics[f"optim/lr_{group['name']}"] = group["lr"]
        metrics["value/warmup"] = float(iteration < self.cfg.algorithm.value_warmup_iterations)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(exp))
        every = self.cfg.cadence.sample_table_every
        if every and (iteration + 1) % every == 0:
            kl = sequence_kl(exp.old_logprobs, exp.ref_logprobs, exp.response_mask).tolist()
            self.log_samples("train/samples", exp.prompts, exp.responses, exp.scores.tolist(), kl)

    # ------------------------------------------------------------------------------------ eval
    def on_validation_epoch_start(self) -> None:
        self.phase = "eval"
        self._val_stats = Stats()
        self._val_error: str | None = None  # a reward's error on this rank, raised at the end
        self.val_scores = []

    def validation_step(self, batch, batch_idx):
        """Sample on held-out prompts (fixed seed, training RNG untouched) and score them.

        A reward error is kept until the end of the evaluation, where every rank raises it
        together (ranks may hold different numbers of eval batches: no collective here)."""
        if self._val_error is not None:
            return
        with torch.random.fork_rng(devices=[]), self.full_weights(sampling=True):
            torch.manual_seed(EVAL_SEED + batch_idx + 7919 * self.global_rank)
            rollout = self.sample(batch)
        scores, self._val_error = scores_or_error(self.reward, rollout, batch)
        gold = None
        if self.gold_reward is not None and self._val_error is None:
            gold, self._val_error = scores_or_error(self.gold_reward, rollout, batch)
        if self._val_error is not None:
            return
        T = self.cfg.generation.temperature
        with self.full_weights():
            seq_kl = sequence_kl(
                response_logprobs(self.policy.lm, rollout, T),
                response_logprobs(self.ref_lm, rollout, T),
                rollout.response_mask.cpu(),
            )
        stats = self._val_stats
        stats.add_mean("val/reward", scores)
        stats.add_mean("val/kl", seq_kl)
        stats.add_mean("val/response_length", rollout.response_mask.sum(dim=1).float())
        stats.add_mean("val/ended_frac", rollout.ended.float())
        if gold is not None:
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
        """Means over all eval prompts of all ranks, logged at x = iterations completed; or the
        reward error of one rank, raised on every rank."""
        iterations_done = self.current_epoch + 1 if self.trainer.state.fn == "fit" else 0
        agreed = agreed_error(self._val_error)
        if agreed is not None:
            raise RewardError(f"in the evaluation after {iterations_done} iterations: {agreed}")
        means = self._val_stats.reduce()
        self.log_dict(means, logger=False)  # for callbacks, the progress line and the task metric
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(means, step=iterations_done)
        self.phase = None

    # ------------------------------------------------------------------------- checkpointing
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rlhf_lightning"] = {
            "kl_penalty": self.cfg.algorithm.kl.state_dict(),
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
        self.cfg.algorithm.kl.load_state_dict(state["kl_penalty"])
        self.nonfinite_skips = state["nonfinite_skips"]

    # --------------------------------------------------------------------------------- helpers
    def check_finite(self, name: str, values: torch.Tensor, iteration: int) -> None:
        """Raise :class:`NonFiniteError` on every rank, with the same message, when ``values``
        is not finite on one."""
        bad = int((~torch.isfinite(values)).sum())
        agreed = agreed_error(f"{bad} non-finite {name}" if bad else None)
        if agreed is not None:
            raise NonFiniteError(
                f"{agreed} at iteration {iteration}; the last good checkpoint is kept"
            )

    def log_samples(self, tag, prompts, responses, scores, kl, gold=None) -> None:
        """The first 8 samples (prompt, response, score, KL[, gold]) to every logger: a table
        where the logger has one, else JSON lines (``samples.log_samples``)."""
        columns = {"prompt": prompts, "response": responses, "score": scores, "kl": kl}
        if gold is not None:
            columns["gold"] = gold
        rows = [dict(zip(columns, values)) for values in list(zip(*columns.values()))[:8]]
        for logger in self.loggers:
            log_samples(logger, tag, rows, self.current_epoch)


def padding_stats(part: Experience, exp: Experience) -> Stats:
    """The share of padded positions a micro-batch's forward runs on (``perf/padding_frac``) and
    what it would be without length grouping and trimming, at the rollout batch's full width
    (``perf/padding_frac_untrimmed``)."""
    stats = Stats()
    real = float(part.attention_mask.sum())
    rows = len(part)
    stats.add("perf/padding_frac", rows * part.input_ids.shape[1] - real, part.input_ids.numel())
    full = rows * exp.input_ids.shape[1]
    stats.add("perf/padding_frac_untrimmed", full - real, full)
    return stats


def backward(module: L.LightningModule, loss: torch.Tensor) -> None:
    """``manual_backward`` under a Trainer (precision, strategy); plain backward outside."""
    if module._trainer is None:
        loss.backward()
    else:
        module.manual_backward(loss)


def clip_gradients(module: L.LightningModule, optimizer, max_norm: float | None) -> float | None:
    """Clip the global gradient norm of all trained parameters to ``max_norm`` (None: only
    measure it); returns the norm before clipping (None under ``16-mixed``).

    With ``16-mixed`` Lightning's precision plugin unscales the fp16 gradients first, and the
    norm is not reported. In every other precision the gradients are already true gradients,
    clipped here directly (Lightning's bf16-mixed plugin refuses to clip for a fused optimizer,
    although there is nothing to unscale). Under the DDP family every rank holds the full,
    already averaged gradients, so the local norm is the global one; under FSDP2 each rank holds
    a shard of them and the norm is reduced over the ranks (``strategies.global_grad_norm``).
    """
    if trainer_precision(module) == "16-mixed":
        if max_norm is not None:
            module.clip_gradients(
                optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm"
            )
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = global_grad_norm([p.grad for p in params if p.grad is not None])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def scores_or_error(
    source, rollout: Rollout, batch: dict
) -> tuple[torch.Tensor | None, str | None]:
    """``(scores, None)``: the (B,) float32 CPU scores of ``source`` on the rollouts, all finite;
    or ``(None, message)`` when the source raised a user error or gave a non-finite score."""
    try:
        scores = source(rollout.prompts, rollout.responses, **columns_of(batch, rollout))
    except UserError as raised:
        return None, str(raised)
    scores = torch.as_tensor(scores).float()
    bad = int((~torch.isfinite(scores)).sum())
    return (None, f"{bad} non-finite reward scores") if bad else (scores, None)


def split_prompts(batch: dict, size: int) -> list[dict]:
    """A ``PromptDataModule`` batch cut into batches of ``size`` prompts, in order (one batch if
    it holds no more)."""
    count = len(batch["prompts"])
    if count <= size:
        return [batch]
    parts = []
    for start in range(0, count, size):
        rows = slice(start, start + size)
        parts.append(
            {
                "input_ids": batch["input_ids"][rows],
                "attention_mask": batch["attention_mask"][rows],
                "prompts": batch["prompts"][rows],
                "columns": {n: v[rows] for n, v in (batch.get("columns") or {}).items()},
            }
        )
    return parts


def columns_of(batch: dict, rollout: Rollout) -> dict[str, list]:
    """The prompt rows' other columns (``batch["columns"]``), one value per rollout: repeated
    for the samples of a prompt, as the rollout repeats the prompt."""
    k = len(rollout.prompts) // len(batch["prompts"])
    return {
        name: [value for value in values for _ in range(k)]
        for name, values in (batch.get("columns") or {}).items()
    }
