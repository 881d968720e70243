"""Experience making: everything the update needs, computed once per rollout batch.

For a batch of B sampled responses (P prompt tokens, R response tokens):

1. the old logprobs and the values: one forward of the policy (no grad; logits / T) with
   ``algorithm.old_logprobs=recompute``; with ``sampler`` the old logprobs are the ones the
   sampler recorded under the model's full tempered softmax (no policy forward; top-k, top-p
   and ``min_new_tokens`` shape only what is drawn, as with ``recompute``), and the values come
   from a value-model forward, or, for a value head on the shared trunk, from the hidden states
   generation produced;
2. one forward of the frozen reference gives the reference logprobs;
3. the reward source's scores are shaped (missing-EOS penalty, DAPO's overlong penalty,
   clipping);
4. per-token rewards: ``r_t = -beta * KL_t`` at every response token when the KL penalty has a
   term in the reward (``algorithm.kl.reward``: its estimator and its beta now), plus the score
   at the last real token (Ziegler et al. 2019; N+ details #3.4);
5. the algorithm's advantage estimator gives advantages and value targets (returns); advantages
   are whitened over the whole batch (all ranks under DDP) when configured.

The value of response token t is read at the position that *predicts* it (P - 1 + t), i.e. the
state before the action, as in TRL and the N+ reproduction.

No padding work: the forwards here and the update's micro-batches run on rows of similar length
(sorted by response length) with every all-padding column cut off (:meth:`Experience.select`),
so a micro-batch is as long as its own longest response, not the batch's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from rlhf_lightning.advantages import AdvantageInputs, token_rewards
from rlhf_lightning.models.masking import position_ids_from_mask
from rlhf_lightning.ops import logprobs_from_logits, masked_whiten
from rlhf_lightning.rollout.generation import Rollout


@dataclass
class Experience:
    """One rollout batch with its experience. B rollouts, P prompt tokens, R response tokens."""

    query_ids: torch.Tensor  # (B, P) long, left-padded prompt tokens
    query_mask: torch.Tensor  # (B, P) long
    response_ids: torch.Tensor  # (B, R) long, right-padded
    response_mask: torch.Tensor  # (B, R) bool, true up to and including the stop token
    old_logprobs: torch.Tensor  # (B, R) fp32, policy logprobs at sampling time, logits / T
    ref_logprobs: torch.Tensor  # (B, R) fp32, frozen reference logprobs, logits / T
    old_values: torch.Tensor  # (B, R) fp32, V(s_t) at sampling time (0 without a value model)
    scores: torch.Tensor  # (B,) fp32, shaped sequence scores
    kl: torch.Tensor  # (B, R) fp32, per-token log pi_old / pi_ref (k1), 0 on padding
    rewards: torch.Tensor  # (B, R) fp32, per-token rewards
    advantages: torch.Tensor  # (B, R) fp32, advantages (whitened if configured)
    returns: torch.Tensor  # (B, R) fp32, value targets (0 without a value model)
    ended: torch.Tensor  # (B,) bool, the response emitted a stop token
    prompts: list[str]
    responses: list[str]
    sampler_logprobs: torch.Tensor | None = None  # (B, R) fp32, under the sampled distribution
    in_loss: torch.Tensor | None = None  # (B,) bool, the row enters the loss (None: every row)

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, R) bool: the tokens the losses train on, the response's tokens of the rows in the
        loss (``algorithm.mask_truncated`` leaves out the responses cut at the length limit)."""
        if self.in_loss is None:
            return self.response_mask
        return self.response_mask & self.in_loss[:, None]

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        """P, the column where responses start."""
        return self.query_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt and response tokens."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) 1 on real tokens."""
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: torch.Tensor) -> Experience:
        """The rows ``index`` (1-D long) of every field, without columns that are padding in all
        of them: leading prompt columns and trailing response columns."""
        rows = index.tolist()
        keep_from = first_real_column(self.query_mask[index])
        keep_to = last_real_column(self.response_mask[index]) + 1
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif not torch.is_tensor(value):
                picked[f.name] = [value[i] for i in rows]
            elif f.name.startswith("query"):
                picked[f.name] = value[index, keep_from:]
            elif value.dim() == 2:
                picked[f.name] = value[index, :keep_to]
            else:
                picked[f.name] = value[index]
        return Experience(**picked)

    def micro_batches(self, rows: torch.Tensor, size: int) -> Iterator[Experience]:
        """``rows`` in micro-batches of ``size``, rows of similar response length together."""
        yield from (self.select(chunk) for chunk in by_length(self.response_mask, rows, size))


def first_real_column(mask: torch.Tensor) -> int:
    """Index of the first column of (b, T) ``mask`` with a real token in some row (0 if none)."""
    real = mask.bool().any(dim=0).nonzero()
    return int(real[0]) if len(real) else 0


def last_real_column(mask: torch.Tensor) -> int:
    """Index of the last column of (b, T) ``mask`` with a real token in some row (0 if none)."""
    real = mask.bool().any(dim=0).nonzero()
    return int(real[-1]) if len(real) else 0


def by_length(response_mask: torch.Tensor, rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``rows`` sorted by response length (longest first) and split into chunks of ``size``."""
    lengths = response_mask[rows].sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    return list(rows[order].split(size))


def reference_logprobs(
    ref_lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
) -> torch.Tensor:
    """Logprobs of the response tokens under the frozen reference: (B, P + R) -> (B, R) fp32."""
    response_len = input_ids.shape[1] - prompt_len
    logits = ref_lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_len + 1,  # the LM head runs on the response positions only
    ).logits  # (B, R + 1, V)
    return logprobs_from_logits(logits[:, :-1], input_ids[:, prompt_len:], temperature)


@torch.no_grad()
def response_logprobs(lm, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Logprobs of a rollout's response tokens under ``lm`` (which shares the tokenizer that
    sampled it), logits divided by ``temperature``: (B, R) float32 on the CPU, padding included."""
    device = next(lm.parameters()).device
    P = rollout.query_ids.shape[1]
    input_ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)  # (B, P + R)
    mask = torch.cat([rollout.query_mask, rollout.response_mask.to(rollout.query_mask.dtype)], 1)
    return reference_logprobs(lm, input_ids.to(device), mask.to(device), P, temperature).cpu()


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 for a response of at most
    ``max_length - cache`` tokens, then linear down to -1 at ``max_length`` tokens (the longest a
    response can be here): (B,) lengths -> (B,) float."""
    start = max_length - cache
    return ((start - lengths.float()) / cache).clamp(min=-1.0, max=0.0)


def shape_scores(
    scores: torch.Tensor,
    ended: torch.Tensor,
    missing_eos_penalty: float | None,
    score_clip: float | None,
    length_penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """The missing-EOS penalty, then an added length penalty, then clipping: (B,), (B,) bool,
    (B,) or None -> (B,)."""
    scores = scores.float()
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, missing_eos_penalty))
    if length_penalty is not None:
        scores = scores + length_penalty.to(scores)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return scores


def global_masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """:func:`masked_whiten` with statistics over all ranks when torch.distributed is running.

    x, mask: (B, T) -> (B, T), 0 on masked-out positions. Uses the unbiased variance like
    ``masked_whiten``; with one process the two are identical.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    m = mask.bool()
    xs = torch.where(m, x, torch.zeros_like(x)).double()
    totals = torch.stack([xs.sum(), m.sum().double()])
    dist.all_reduce(totals)
    mean = totals[0] / totals[1]
    sq = torch.where(m, (xs - mean) ** 2, torch.zeros_like(xs)).sum()
    dist.all_reduce(sq)
    var = sq / (totals[1] - 1)
    out = (xs - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out)).to(x.dtype)


def experience_forwards(
    policy,
    ref_lm,
    exp_rows: Experience,
    rows_per_forward: int,
    temperature: float,
    policy_logprobs: bool = True,
    values_known: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Old logprobs, values and reference logprobs of the rollouts: each (B, R) or None.

    ``policy_logprobs=False`` skips the LM head (None for the logprobs); the values are None
    without a value head or with ``values_known``. The forwards run in chunks of
    ``rows_per_forward`` rows of similar length, each cut to its own longest prompt and
    response; results are 0 beyond a row's chunk length.
    """
    # a block rather than @torch.no_grad(): mutmut skips decorated functions
    with torch.no_grad():
        B, R = exp_rows.response_ids.shape
        device = exp_rows.response_ids.device
        want_values = policy.value_head is not None and not values_known
        old_logprobs = torch.zeros(B, R, device=device) if policy_logprobs else None
        values = torch.zeros(B, R, device=device) if want_values else None
        ref_logprobs = torch.zeros(B, R, device=device)
        all_rows = torch.arange(B, device=device)
        for index in by_length(exp_rows.response_mask, all_rows, rows_per_forward):
            part = exp_rows.select(index)
            r = part.response_ids.shape[1]
            ids, am, P = part.input_ids, part.attention_mask, part.prompt_len
            if policy_logprobs:
                logits, part_values = policy(ids, am, response_start=P)
                old_logprobs[index, :r] = logprobs_from_logits(
                    logits, part.response_ids, temperature
                )
                del logits
            elif want_values:
                part_values = policy.values(ids, am, response_start=P)
            if want_values:
                values[index, :r] = part_values.float()
            ref_logprobs[index, :r] = reference_logprobs(ref_lm, ids, am, P, temperature)
        return old_logprobs, values, ref_logprobs


def make_experience(
    policy,
    ref_lm,
    rollout: Rollout,
    scores: torch.Tensor,
    cfg,
) -> Experience:
    """Old logprobs, values, reference logprobs, rewards and advantages of a rollout.

    Args:
        policy: ``PolicyWithValueHead``; ``policy(input_ids, attention_mask)`` -> logits, values.
        ref_lm: the frozen reference causal LM.
        rollout: sampled responses (B rows, ``cfg.algorithm.samples_per_prompt`` per prompt,
            group by group).
        scores: (B,) raw scores of the reward source.
        cfg: the run's ``RLConfig``; its KL penalty's reward term (``cfg.algorithm.kl.reward``)
            gives the estimator and the beta of the rewards.
    """
    # a block rather than @torch.no_grad(): mutmut skips decorated functions
    with torch.no_grad():
        alg = cfg.algorithm
        mask = rollout.response_mask
        empty = torch.zeros_like(mask, dtype=torch.float32)
        exp = Experience(
            query_ids=rollout.query_ids,
            query_mask=rollout.query_mask,
            response_ids=rollout.response_ids,
            response_mask=mask,
            old_logprobs=empty,
            ref_logprobs=empty,
            old_values=empty,
            scores=scores,
            kl=empty,
            rewards=empty,
            advantages=empty,
            returns=empty,
            ended=rollout.ended,
            prompts=rollout.prompts,
            responses=rollout.responses,
            sampler_logprobs=rollout.sampler_logprobs,
        )
        T = cfg.generation.temperature
        from_sampler = alg.old_logprobs == "sampler"
        values_from_hidden = from_sampler and rollout.last_hidden is not None
        old_logprobs, values, ref_logprobs = experience_forwards(
            policy,
            ref_lm,
            exp,
            cfg.budget.experience_rows,
            T,
            policy_logprobs=not from_sampler,
            values_known=values_from_hidden,
        )
        if from_sampler:  # the full tempered softmax, not the truncated one drawn from
            old_logprobs = rollout.model_logprobs.to(ref_logprobs.device)
        if values_from_hidden:
            values = policy.values_from_hidden(rollout.last_hidden.to(ref_logprobs.device))
        length_penalty = None
        if alg.overlong_penalty is not None:
            length_penalty = alg.overlong_penalty.coef * overlong_penalty(
                mask.sum(dim=1), cfg.generation.max_new_tokens, alg.overlong_penalty.cache
            )
        shaped = shape_scores(
            scores.to(old_logprobs.device),
            rollout.ended,
            alg.missing_eos_penalty,
            alg.score_clip,
            length_penalty,
        )
        in_reward = alg.kl.reward
        rewards, _ = token_rewards(
            shaped,
            old_logprobs,
            ref_logprobs,
            mask,
            in_reward.coef if in_reward else 0.0,
            in_reward.estimator if in_reward else "k1",
            in_reward.clamp if in_reward else None,
        )
        if alg.whiten_rewards:
            rewards = global_masked_whiten(rewards, mask, shift_mean=False)
        inputs = AdvantageInputs(rewards, values, mask, group_size=alg.samples_per_prompt)
        advantages, returns = alg.advantage(inputs)
        if alg.whiten_advantages:
            advantages = global_masked_whiten(advantages, mask)
        zero = torch.zeros_like(old_logprobs)
        exp.old_logprobs = torch.where(mask, old_logprobs, zero)
        exp.ref_logprobs = torch.where(mask, ref_logprobs, zero)
        exp.old_values = zero if values is None else torch.where(mask, values, zero)
        exp.kl = torch.where(mask, old_logprobs - ref_logprobs, zero)
        exp.scores, exp.rewards = shaped, rewards
        exp.advantages = advantages
        exp.returns = zero if returns is None else returns
        if alg.mask_truncated:
            exp.in_loss = rollout.ended.to(mask.device)
        return exp
