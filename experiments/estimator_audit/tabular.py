"""Exact expected updates of the project's estimators on a language model small enough to
enumerate.

The model is a table: a softmax policy over ``V`` tokens (the last one is the stop token) with
horizon ``T``, whose logits at each step are a row of a parameter table indexed by the response
prefix. Every complete response ``y`` (it ends at the stop token or after ``T`` tokens) and its
probability can be listed, so both sides of "the estimator is unbiased" are exact numbers:

- the objective ``J(theta) = E_pi[R(y)] - beta * KL(pi || pi_ref)`` (sequence-level KL, both
  policies tempered by ``T``) and its gradient, by autograd over the enumeration
  (:func:`objective`);
- the expected update ``E[g]`` of a preset: every rollout batch it could draw (every b-tuple of
  responses: a group of k for the group presets), weighted by its probability under the sampling
  policy, each run through **the project's own training step**: ``make_experience`` (old and
  reference logprobs, the KL penalty's terms, advantages, whitening) and
  ``PPOModule.minibatch_backward`` (policy loss, sampler correction, KL loss, value loss,
  aggregation with its global denominator, micro-batches, backward), see
  :func:`expected_update`. The gradient read is that of the policy table; ``g`` is minus it (the
  ascent direction).

The LM satisfies what the project's code calls on a Hugging Face causal LM (``forward`` with
``logits_to_keep``, ``base_model(...).last_hidden_state``, ``get_output_embeddings``,
``config.hidden_size``). Its last hidden state is the one-hot code of the prefix, so the
project's linear value head on it is a table too, which lets the audit set the value baseline to
any function of the state, the true value function included (:func:`true_values`).
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import Tensor, nn

PROMPT_TOKEN = 0  # every rollout's one-token prompt (any id works: the table ignores it)


# ------------------------------------------------------------------------------- the problem
def num_prefixes(vocab: int, horizon: int) -> int:
    """Rows of the table: every prefix of length 0 .. horizon - 1 over the vocabulary."""
    return sum(vocab**j for j in range(horizon))


def enumerate_responses(vocab: int, horizon: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every complete response, in a fixed order.

    -> ids (N, T) long, right-padded with the stop token; mask (N, T) bool, true up to and
    including the stop token; ended (N,) bool, the response emitted the stop token.
    """
    stop = vocab - 1
    responses = []
    for length in range(1, horizon + 1):
        for body in itertools.product(range(stop), repeat=length - 1):
            responses.append((*body, stop))  # ends with the stop token
            if length == horizon:
                responses.extend((*body, token) for token in range(stop))  # cut at T
    ids = torch.full((len(responses), horizon), stop, dtype=torch.long)
    mask = torch.zeros(len(responses), horizon, dtype=torch.bool)
    for row, response in enumerate(responses):
        ids[row, : len(response)] = torch.tensor(response)
        mask[row, : len(response)] = True
    ended = (ids == stop).logical_and(mask).any(dim=1)
    return ids, mask, ended


def prefix_index(response_ids: Tensor, vocab: int, horizon: int) -> Tensor:
    """The table row of the state before each response token: (B, R) -> (B, R) long.

    The state before token t is the prefix ``y_0 .. y_{t-1}`` (length t), numbered
    ``sum_{j<t} V^j + code(prefix)`` in base V. Prefixes of length >= horizon (never a state)
    get row 0.
    """
    B, R = response_ids.shape
    rows = torch.zeros(B, R, dtype=torch.long, device=response_ids.device)
    code = torch.zeros(B, dtype=torch.long, device=response_ids.device)
    offset = 0
    for t in range(R):
        if t < horizon:
            rows[:, t] = offset + code
            offset += vocab**t
        code = code * vocab + response_ids[:, t]
    return rows


@dataclass
class TabularProblem:
    """A tabular policy-optimisation problem. P table rows (prefixes), V tokens, N responses."""

    vocab: int
    horizon: int
    temperature: float
    beta: float
    logits: Tensor  # (P, V) float64, the policy's parameters theta
    ref_logits: Tensor  # (P, V) float64, the frozen reference
    rewards: Tensor  # (N,) float64, R(y) of each response of enumerate_responses
    responses: tuple[Tensor, Tensor, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.responses = enumerate_responses(self.vocab, self.horizon)

    @property
    def stop(self) -> int:
        return self.vocab - 1


def random_problem(
    vocab: int = 3,
    horizon: int = 3,
    seed: int = 0,
    temperature: float = 0.7,
    beta: float = 0.1,
    scale: float = 1.0,
) -> TabularProblem:
    """Policy and reference logits ~ N(0, scale^2), rewards ~ N(0, 1), from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    rows = num_prefixes(vocab, horizon)
    n = len(enumerate_responses(vocab, horizon)[0])

    def draw(*shape: int, std: float = 1.0) -> Tensor:  # float32 values: the code's precision
        return (std * torch.randn(*shape, generator=gen, dtype=torch.float64)).float().double()

    return TabularProblem(
        vocab=vocab,
        horizon=horizon,
        temperature=temperature,
        beta=beta,
        logits=draw(rows, vocab, std=scale),
        ref_logits=draw(rows, vocab, std=scale),
        rewards=draw(n),
    )


# ------------------------------------------------------------------------- exact quantities
def token_logprobs(problem: TabularProblem, logits: Tensor) -> Tensor:
    """log pi(y_t | y_<t) of every response token under ``softmax(logits / T)``: (N, T), 0 on
    padding (float64, differentiable in ``logits``)."""
    ids, mask, _ = problem.responses
    rows = prefix_index(ids, problem.vocab, problem.horizon)
    table = torch.log_softmax(logits / problem.temperature, dim=-1)  # (P, V)
    picked = table[rows, ids]  # (N, T)
    return torch.where(mask, picked, torch.zeros_like(picked))


def sequence_logprobs(problem: TabularProblem, logits: Tensor) -> Tensor:
    """log pi(y) of every response: (N,)."""
    return token_logprobs(problem, logits).sum(dim=1)


def objective(problem: TabularProblem, logits: Tensor) -> Tensor:
    """``J = E_pi[R] - beta * KL(pi || pi_ref)`` over the enumeration (0-dim, differentiable)."""
    logp = sequence_logprobs(problem, logits)
    ref = sequence_logprobs(problem, problem.ref_logits)
    prob = logp.exp()
    return (prob * problem.rewards).sum() - problem.beta * (prob * (logp - ref)).sum()


def objective_gradient(problem: TabularProblem, logits: Tensor | None = None) -> Tensor:
    """``grad J`` at ``logits`` (default: the problem's): (P, V) float64."""
    theta = (problem.logits if logits is None else logits).detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective(problem, theta), theta)
    return grad


def per_state_kl_gradient(problem: TabularProblem, logits: Tensor | None = None) -> Tensor:
    """``grad sum_s d(s) KL(pi(.|s) || pi_ref(.|s))`` with the state distribution ``d`` held
    fixed: what a per-token KL loss estimates (P, V)."""
    theta = (problem.logits if logits is None else logits).detach().clone().requires_grad_()
    T = problem.temperature
    logp_table = torch.log_softmax(theta / T, dim=-1)  # (P, V)
    ref_table = torch.log_softmax(problem.ref_logits / T, dim=-1)
    state_kl = (logp_table.exp() * (logp_table - ref_table)).sum(dim=-1)  # (P,)
    visits = state_visits(problem, theta.detach())  # (P,)
    (grad,) = torch.autograd.grad((visits * state_kl).sum(), theta)
    return grad


def state_visits(problem: TabularProblem, logits: Tensor) -> Tensor:
    """Probability that each table row is a state the response passes through: (P,)."""
    ids, mask, _ = problem.responses
    rows = prefix_index(ids, problem.vocab, problem.horizon)
    prob = sequence_logprobs(problem, logits).exp()  # (N,)
    visits = torch.zeros(logits.shape[0], dtype=logits.dtype)
    weights = torch.where(mask, prob[:, None].expand_as(mask), torch.zeros((), dtype=prob.dtype))
    return visits.index_add(0, rows[mask], weights[mask])


def true_values(problem: TabularProblem, logits: Tensor | None = None) -> Tensor:
    """``V^pi(s) = E[sum_{t' >= t} r_t' | s_t = s]`` for the per-token rewards with k1 in the
    reward, ``r_t = -beta * (log pi - log pi_ref)(y_t | s_t)`` plus ``R(y)`` at the last
    token: (P,), 0 on rows that are never a state."""
    logits = problem.logits if logits is None else logits
    ids, mask, _ = problem.responses
    rows = prefix_index(ids, problem.vocab, problem.horizon)
    logp = token_logprobs(problem, logits)
    kl = logp - token_logprobs(problem, problem.ref_logits)
    last = mask.sum(dim=1) - 1
    rewards = -problem.beta * kl
    rewards[torch.arange(len(ids)), last] += problem.rewards
    to_go = torch.where(mask, rewards, torch.zeros_like(rewards)).flip(1).cumsum(1).flip(1)
    prob = logp.sum(dim=1).exp()[:, None].expand_as(mask)
    totals = torch.zeros(logits.shape[0], dtype=logits.dtype)
    weights = torch.zeros(logits.shape[0], dtype=logits.dtype)
    totals.index_add_(0, rows[mask], (prob * to_go)[mask])
    weights.index_add_(0, rows[mask], prob[mask])
    return torch.where(weights > 0, totals / weights.clamp(min=1e-300), 0.0)


# --------------------------------------------------------------------- the LM the code sees
class PrefixTrunk(nn.Module):
    """``base_model`` of :class:`TabularLM`: the last hidden state is one_hot(prefix row)."""

    def __init__(self, vocab: int, horizon: int, rows: int) -> None:
        super().__init__()
        self.vocab, self.horizon, self.rows = vocab, horizon, rows

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        # Column 0 is the prompt; the state at column c is the response prefix ids[:, 1 : c + 1].
        # Column c predicts y_c, so it holds the state before y_c; the last column predicts
        # nothing the code reads (row 0).
        index = prefix_index(input_ids[:, 1:], self.vocab, self.horizon)  # (B, L - 1)
        index = torch.cat([index, torch.zeros_like(index[:, :1])], dim=1)  # (B, L)
        hidden = nn.functional.one_hot(index, self.rows).float()
        return SimpleNamespace(last_hidden_state=hidden)


class TabularLM(nn.Module):
    """A causal LM over ``[prompt, y_0, y_1, ...]`` whose logits at each position are the table
    row of the response prefix so far; the table is the weight of its LM head (V, P)."""

    def __init__(self, logits: Tensor, vocab: int, horizon: int) -> None:
        super().__init__()
        rows = logits.shape[0]
        self.config = SimpleNamespace(hidden_size=rows, vocab_size=vocab)
        self.trunk = PrefixTrunk(vocab, horizon, rows)
        self.lm_head = nn.Linear(rows, vocab, bias=False)
        self.set_logits(logits)

    @property
    def base_model(self) -> PrefixTrunk:
        return self.trunk

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_logits(self, logits: Tensor) -> None:
        with torch.no_grad():
            self.lm_head.weight.copy_(logits.T.float())

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.trunk(input_ids).last_hidden_state
        keep = kwargs.get("logits_to_keep", 0)
        if keep:
            hidden = hidden[:, -keep:]
        return SimpleNamespace(logits=self.lm_head(hidden))


# ----------------------------------------------------------------------- the expected update
@dataclass
class UpdateMoments:
    """The first two moments of an estimator's update over every batch it can draw."""

    mean: Tensor  # (P, V) float64, E[g]
    second: float  # E[||g||^2]
    batches: int

    @property
    def variance(self) -> float:
        """Trace of the covariance of one batch's update."""
        return max(self.second - float((self.mean**2).sum()), 0.0)


def audit_module(problem: TabularProblem, cfg, values: Tensor | None = None):
    """A ``PPOModule`` around the tabular policy (value head set to ``values``: (P,), else 0)
    and the tabular reference, with ``cfg`` (an ``RLConfig``) as its config."""
    from rlhf_lightning.modules.ppo import PPOModule

    lm = TabularLM(problem.logits, problem.vocab, problem.horizon)
    ref = TabularLM(problem.ref_logits, problem.vocab, problem.horizon)
    policy = cfg.algorithm.value_model.build(lm)
    if policy.value_head is not None and values is not None:
        with torch.no_grad():
            policy.value_head.weight.copy_(values.float()[None, :])
    return PPOModule(policy, ref, None, None, cfg)


def rollout_of(problem: TabularProblem, rows: tuple[int, ...], sampler_logprobs: Tensor):
    """The rollout of the responses ``rows`` (group by group), as generation returns it."""
    from rlhf_lightning.rollout.generation import Rollout

    ids, mask, ended = problem.responses
    index = torch.tensor(rows)
    b = len(rows)
    return Rollout(
        query_ids=torch.full((b, 1), PROMPT_TOKEN, dtype=torch.long),
        query_mask=torch.ones(b, 1, dtype=torch.long),
        response_ids=ids[index],
        response_mask=mask[index],
        ended=ended[index],
        prompts=[""] * b,
        responses=[str(r) for r in rows],
        sampler_logprobs=sampler_logprobs[index].float(),
    )


def expected_update(
    problem: TabularProblem,
    cfg,
    thetas: list[Tensor] | None = None,
    values: Tensor | None = None,
    sampling_logits: Tensor | None = None,
) -> list[UpdateMoments]:
    """``E[g]`` and ``E[||g||^2]`` of one training step of ``cfg`` at each of ``thetas``.

    The rollout batch (``cfg.budget.rollout_batch_size`` responses, one minibatch) is drawn
    from ``softmax(sampling_logits / T)`` (default: the policy's own logits, the old policy);
    the experience is made with the policy at ``problem.logits`` (theta_old); the loss is
    taken at each theta (default: theta_old only, on-policy). Exact: every batch is enumerated.
    """

    cfg_b = cfg.budget
    b = cfg_b.rollout_batch_size
    if cfg_b.minibatch_size != b:
        raise ValueError("the audit takes one optimizer step on the whole batch: minibatch = batch")
    thetas = [problem.logits] if thetas is None else thetas
    module = audit_module(problem, cfg, values)
    lm = module.policy.lm
    sampler = problem.logits if sampling_logits is None else sampling_logits
    sampler_token_logprobs = token_logprobs(problem, sampler)
    sampler_seq = sampler_token_logprobs.sum(dim=1)
    P, V = problem.logits.shape
    means = [torch.zeros(P, V, dtype=torch.float64) for _ in thetas]
    seconds = [0.0 for _ in thetas]
    rows = torch.arange(b)
    n = len(sampler_seq)
    count = 0
    for batch in itertools.product(range(n), repeat=b):
        prob = float(sampler_seq[list(batch)].sum().exp())
        rollout = rollout_of(problem, batch, sampler_token_logprobs)
        scores = problem.rewards[list(batch)].float()
        lm.set_logits(problem.logits)
        exp = module.make_experience(rollout, scores, 0)
        for j, theta in enumerate(thetas):
            lm.set_logits(theta)
            module.policy.zero_grad(set_to_none=True)
            module.minibatch_backward(exp, rows, False, 0)
            g = -lm.lm_head.weight.grad.T.double()
            means[j] += prob * g
            seconds[j] += prob * float((g**2).sum())
        count += 1
    lm.set_logits(problem.logits)
    return [UpdateMoments(m, s, count) for m, s in zip(means, seconds)]


# ------------------------------------------------------------------------------- comparisons
@dataclass
class Comparison:
    """``E[g]`` against a target gradient: scale, relative bias (raw and after the best scale),
    cosine, and the relative variance of one batch's update."""

    scale: float  # c = <E g, target> / ||target||^2
    bias: float  # ||E g - target|| / ||target||
    direction_bias: float  # ||E g - c target|| / ||c target||
    cosine: float
    variance: float  # tr Cov(g) / ||E g||^2

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def compare(moments: UpdateMoments, target: Tensor) -> Comparison:
    mean = moments.mean
    norm2 = float((target**2).sum())
    scale = float((mean * target).sum()) / norm2
    bias = float((mean - target).norm()) / norm2**0.5
    scaled = scale * target
    direction = float((mean - scaled).norm()) / max(float(scaled.norm()), 1e-300)
    cosine = float((mean * target).sum()) / max(float(mean.norm()) * norm2**0.5, 1e-300)
    variance = moments.variance / max(float((mean**2).sum()), 1e-300)
    return Comparison(scale, bias, direction, cosine, variance)


def ascent_steps(problem: TabularProblem, steps: int, size: float) -> list[Tensor]:
    """theta after 0 .. ``steps`` steps along the exact gradient, each moving the largest logit by
    ``size`` (the policy a later minibatch or epoch sees, its samples still from theta_0)."""
    thetas = [problem.logits]
    for _ in range(steps):
        grad = objective_gradient(problem, thetas[-1])
        thetas.append((thetas[-1] + size * grad / grad.abs().max()).float().double())
    return thetas


def audit_config(preset: str, overrides: dict | None = None, kl_coef: float | None = None):
    """The ``RLConfig`` of ``rlhf-train task=ppo algorithm=<preset>`` with ``overrides``,
    composed from ``conf/`` as the CLI composes it: a key with a ``/`` chooses a config group
    option (``algorithm/policy_loss: clipped``), a dotted key sets a value (a mapping replaces
    the node). ``kl_coef``: the beta of each term the KL penalty has (in the rewards, in the
    loss)."""
    from omegaconf import OmegaConf, open_dict

    from rlhf_lightning.config import rl_config_from

    overrides = overrides or {}
    groups = tuple(f"{key}={value}" for key, value in overrides.items() if "/" in key)
    cfg = copy.deepcopy(_composed(("task=ppo", f"algorithm={preset}", *groups)))
    with open_dict(cfg):
        for key, value in overrides.items():
            if "/" not in key:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        for site in ("reward", "loss"):
            if kl_coef is not None and cfg.algorithm.kl[site] is not None:
                cfg.algorithm.kl[site].coef = kl_coef
    return rl_config_from(cfg)


@functools.cache
def _composed(overrides: tuple[str, ...]):
    """The config Hydra composes from ``conf/`` with ``overrides`` (composed once per set)."""
    from hydra import compose, initialize_config_dir

    from rlhf_lightning.cli.train import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))
