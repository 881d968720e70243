"""Experience making: everything the PPO update needs, computed once per rollout batch.

For a batch of B sampled responses (P prompt tokens, R response tokens):

1. one forward of the policy (no grad) gives the old logprobs (logits / T) and the values;
2. one forward of the frozen reference gives the reference logprobs;
3. the reward source's scores are shaped (missing-EOS penalty, clipping);
4. per-token rewards: ``r_t = -beta * KL_t`` at every response token, plus the score at the last
   real token (Ziegler et al. 2019; N+ details #3.4);
5. GAE (gamma, lambda) gives advantages and returns, advantages whitened over the whole batch
   (all ranks under DDP).

The value of response token t is read at the position that *predicts* it (P - 1 + t), i.e. the
state before the action, as in TRL and the N+ reproduction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from rlhf_lightning.advantages import gae, token_rewards
from rlhf_lightning.config import PPOConfig
from rlhf_lightning.models.masking import position_ids_from_mask
from rlhf_lightning.ops import logprobs_from_logits, masked_mean, masked_whiten
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
    old_values: torch.Tensor  # (B, R) fp32, V(s_t) at sampling time
    scores: torch.Tensor  # (B,) fp32, shaped sequence scores
    kl: torch.Tensor  # (B, R) fp32, per-token KL estimate, 0 on padding
    rewards: torch.Tensor  # (B, R) fp32, per-token rewards
    advantages: torch.Tensor  # (B, R) fp32, GAE advantages (whitened if configured)
    returns: torch.Tensor  # (B, R) fp32, advantages + old_values (before whitening)
    ended: torch.Tensor  # (B,) bool, the response emitted a stop token
    prompts: list[str]
    responses: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt and response tokens."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) 1 on real tokens."""
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)

    def select(self, index: torch.Tensor) -> Experience:
        """The rows ``index`` (a 1-D long tensor) of every field."""
        picked = {}
        rows = index.tolist()
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if torch.is_tensor(value) else [value[i] for i in rows]
        return Experience(**picked)


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


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """Apply the missing-EOS penalty and score clipping: (B,), (B,) bool -> (B,)."""
    scores = scores.float()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
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


@torch.no_grad()
def make_experience(
    policy,
    ref_lm,
    rollout: Rollout,
    scores: torch.Tensor,
    cfg: PPOConfig,
    kl_coef: float,
) -> Experience:
    """Compute old logprobs, values, reference logprobs, rewards and advantages of a rollout.

    Forward passes run in chunks of ``cfg.experience_rows`` rows (``experience_batch_size``,
    default ``micro_batch_size``) to bound memory.

    Args:
        policy: ``PolicyWithValueHead``; ``policy(input_ids, attention_mask)`` -> logits, values.
        ref_lm: the frozen reference causal LM.
        rollout: sampled responses (B rows).
        scores: (B,) raw scores of the reward source.
        kl_coef: beta of this iteration (used only with ``cfg.kl.placement == "reward"``).
    """
    P = rollout.query_ids.shape[1]
    mask = rollout.response_mask
    input_ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
    attention_mask = torch.cat([rollout.query_mask, mask.to(rollout.query_mask.dtype)], dim=1)
    T = cfg.generation.temperature

    old_logprobs, old_values, ref_logprobs = [], [], []
    for rows in torch.arange(input_ids.shape[0]).split(cfg.experience_rows):
        ids, am = input_ids[rows], attention_mask[rows]
        logits, values = policy(ids, am, response_start=P)
        old_logprobs.append(logprobs_from_logits(logits, ids[:, P:], T))
        old_values.append(values.float())
        del logits
        ref_logprobs.append(reference_logprobs(ref_lm, ids, am, P, T))
    old_logprobs = torch.cat(old_logprobs)
    old_values = torch.cat(old_values)
    ref_logprobs = torch.cat(ref_logprobs)

    shaped = shape_scores(scores.to(old_logprobs.device), rollout.ended, cfg)
    beta = kl_coef if cfg.kl.placement == "reward" else 0.0
    rewards, kl = token_rewards(
        shaped, old_logprobs, ref_logprobs, mask, beta, kind=cfg.kl.estimator
    )
    if cfg.whiten_rewards:
        rewards = global_masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = global_masked_whiten(advantages, mask)
    zero = torch.zeros_like(old_values)
    return Experience(
        query_ids=rollout.query_ids,
        query_mask=rollout.query_mask,
        response_ids=rollout.response_ids,
        response_mask=mask,
        old_logprobs=torch.where(mask, old_logprobs, zero),
        ref_logprobs=torch.where(mask, ref_logprobs, zero),
        old_values=torch.where(mask, old_values, zero),
        scores=shaped,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        ended=rollout.ended,
        prompts=rollout.prompts,
        responses=rollout.responses,
    )


def sequence_kl(exp: Experience) -> torch.Tensor:
    """(B,) KL estimate per sequence: the per-token KL summed over the response."""
    return torch.where(exp.response_mask, exp.kl, torch.zeros_like(exp.kl)).sum(dim=1)


def mean_token_kl(exp: Experience) -> torch.Tensor:
    """0-dim mean per-token KL over real response tokens."""
    return masked_mean(exp.kl, exp.response_mask)
