"""The loss of a PPO-family update on one micro-batch, and its metrics.

From the policy's forward on a micro-batch (``logits`` and ``values`` at its response
positions) and the micro-batch's experience, :class:`Objective` computes each term per token,
aggregates it with the algorithm's loss aggregation over the **minibatch's** denominator (counted
on all ranks, so the terms of a minibatch's micro-batches on all ranks sum to the minibatch's
loss), and combines them::

    loss = w * (policy - ent_coef * entropy + beta * kl) + value_coef * value

- ``policy``: the policy loss (``algorithm.policy_loss``), each token's loss times the sampler
  correction's weight where one is set;
- ``entropy``: of ``softmax(logits / T)`` (a bonus: subtracted);
- ``kl``: the KL estimate against the reference, when the KL penalty has a loss term
  (``algorithm.kl.loss``, with its beta);
- ``value``: the value loss (``algorithm.value_model``), when there is a value function;
- ``w`` is 0 in the value warm-up (the policy does not move), else 1.

The metrics come back as a :class:`~rlhf_lightning.stats.Stats`: token means (``policy/*``,
``value/clipfrac``) and each term under ``optim/loss_<name>``, weighted by the micro-batch's
share of the minibatch's denominator, so that the logged value is the mean over minibatches of
each minibatch's whole term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.losses import aggregate, value_loss
from rlhf_lightning.ops import entropy_from_logits, logprobs_from_logits, zero_masked
from rlhf_lightning.stats import Stats


class Objective:
    """The loss terms of the algorithm ``alg`` (an ``AlgorithmConfig``) for responses sampled at
    ``temperature``."""

    def __init__(self, alg, temperature: float) -> None:
        self.alg = alg
        self.temperature = temperature

    def __call__(
        self,
        logits: Tensor,
        values: Tensor | None,
        part,
        denominator: Tensor,
        warmup: bool,
    ) -> tuple[Tensor, Stats]:
        """The micro-batch's share of the minibatch's loss, and its metrics.

        logits: (b, R, V) at the response positions; values: (b, R) or None; part: the
        micro-batch's ``Experience`` (b rows, R response tokens; the losses train on its
        ``loss_mask``); denominator: 0-dim, the
        aggregation's units over the whole minibatch on all ranks; warmup: train the value
        function alone.
        """
        alg, mask = self.alg, part.loss_mask
        logprobs = logprobs_from_logits(logits, part.response_ids, self.temperature)
        policy = alg.policy_loss(logprobs, part.old_logprobs, part.advantages, mask)
        policy_tokens = policy.loss
        if alg.sampler_correction is not None:
            weights, _ = alg.sampler_correction(part.old_logprobs, part.sampler_logprobs, mask)
            policy_tokens = policy_tokens * weights
        with torch.set_grad_enabled(alg.ent_coef > 0 and torch.is_grad_enabled()):
            entropy = zero_masked(entropy_from_logits(logits, self.temperature), mask)
        token_weights = alg.loss_aggregation.token_weights(mask)

        def aggregated(per_token: Tensor) -> Tensor:
            return aggregate(per_token, token_weights, denominator)

        terms = {"policy": aggregated(policy_tokens), "entropy": aggregated(entropy)}
        loss = terms["policy"] - alg.ent_coef * terms["entropy"]
        kl_term = alg.kl.loss
        if kl_term is not None:
            kl = kl_term.estimate(zero_masked(logprobs, mask), part.ref_logprobs)
            terms["kl"] = aggregated(zero_masked(kl, mask))
            loss = loss + kl_term.coef * terms["kl"]
        loss = (0.0 if warmup else 1.0) * loss
        stats = Stats()
        if values is not None:
            value_tokens, value_clipped = value_loss(
                values.float(), part.old_values, part.returns, mask, alg.value_model.clip
            )
            terms["value"] = aggregated(value_tokens)
            loss = loss + alg.value_model.coef * terms["value"]
            stats.add("value/clipfrac", value_clipped.sum(), mask.sum())
        terms["total"] = loss
        share = alg.loss_aggregation.units(mask) / denominator
        for name, value in terms.items():
            stats.add(f"optim/loss_{name}", value.detach(), share)
        tokens = mask.sum()
        stats.add("policy/entropy", entropy.detach().sum(), tokens)
        if not warmup:
            stats.add("policy/clipfrac", policy.clipped.sum(), tokens)
            stats.add("policy/approx_kl", 0.5 * (policy.log_ratio**2).sum(), tokens)
            stats.add("policy/ratio_mean", policy.ratio.sum(), tokens)
            if mask.any():
                stats.add_max("policy/ratio_max", policy.ratio[mask].max())
        return loss, stats
