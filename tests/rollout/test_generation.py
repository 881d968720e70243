"""Rollout generation helpers: the EOS trick and stop tokens."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.rollout.generation import (
    TokenSampler,
    resolve_stop_token_ids,
    sample_responses,
    sample_tokens,
    sampling_copy,
    truncate_after_stop,
)

PAD, STOP = 0, 2


def test_truncate_after_first_stop_token_pads_the_rest():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask, ended = truncate_after_stop(ids, [STOP], PAD)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    assert ended.tolist() == [True, False, True]


def test_no_stop_token_keeps_everything():
    ids = torch.tensor([[5, 2, 7]])
    out, mask, ended = truncate_after_stop(ids, [], PAD)
    assert out.tolist() == [[5, 2, 7]] and mask.all() and not ended.any()


def test_several_stop_tokens_cut_at_the_first_of_any():
    ids = torch.tensor([[5, 9, 7, 2]])
    out, mask, _ = truncate_after_stop(ids, [2, 9], PAD)
    assert out.tolist() == [[5, 9, 0, 0]]


def test_stop_token_resolution():
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    assert resolve_stop_token_ids(tok, "eos") == [tok.eos_token_id]
    assert resolve_stop_token_ids(tok, None) == []
    newline = tok.encode("\n", add_special_tokens=False)[0]
    assert resolve_stop_token_ids(tok, "\n") == [newline, tok.eos_token_id]
    with pytest.raises(ValueError, match="exactly one token"):
        resolve_stop_token_ids(tok, "two")


def test_sampled_responses_are_cut_at_the_stop_token_and_decoded_without_it():
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    prompts = ["ab", "a longer prompt"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    # With a stop token that the random model emits often ("e" and EOS), rows end early.
    stops = resolve_stop_token_ids(tok, "e")
    torch.manual_seed(0)
    gen = GenerationConfig(temperature=1.0, max_new_tokens=40)
    rollout = sample_responses(
        lm, tok, enc["input_ids"], enc["attention_mask"], prompts, gen, stops
    )
    for ids, mask, ended, text in zip(
        rollout.response_ids, rollout.response_mask, rollout.ended, rollout.responses
    ):
        kept = ids[mask].tolist()
        assert all(t == tok.pad_token_id for t in ids[~mask].tolist())
        if ended:
            assert kept[-1] in stops and not any(t in stops for t in kept[:-1])
        assert "e" not in text or not ended


def test_sampling_copy_casts_without_sharing_or_copying_grads():
    lm = load_causal_lm("builtin:tiny")
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied in the tiny model
    for p in lm.parameters():
        p.grad = torch.ones_like(p)
    for dtype in (torch.float32, torch.bfloat16):
        copy_ = sampling_copy(lm, dtype)
        assert copy_.lm_head.weight is copy_.model.embed_tokens.weight  # still tied
        assert not copy_.training
        for (name, p), src in zip(copy_.named_parameters(), lm.parameters(), strict=True):
            assert p.dtype == dtype and not p.requires_grad and p.grad is None, name
            assert p.data_ptr() != src.data_ptr(), name  # its own storage, even in fp32
            assert torch.equal(p, src.detach().to(dtype)), name
        for b, src in zip(copy_.buffers(), lm.buffers(), strict=True):
            assert b.dtype == src.dtype and b.data_ptr() != src.data_ptr()


def _tiny_rollout(lm, tok, gen, stops, n=16, seed=0):
    prompts = [f"p{i}" for i in range(n)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    return sample_responses(lm, tok, enc["input_ids"], enc["attention_mask"], prompts, gen, stops)


def test_the_checkpoints_generation_defaults_do_not_change_what_is_sampled():
    """generate() fills every field left unset from the checkpoint's generation_config (SmolLM2:
    eos_token_id=2): with stop_token=null rows must still run to max_new_tokens, and a stop
    token must be the only thing that ends a row."""
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    lm.generation_config.eos_token_id = list(range(len(tok)))  # any token would end a row
    lm.generation_config.suppress_tokens = list(range(1, len(tok)))  # only token 0 left
    saved = lm.generation_config.to_dict()
    gen = GenerationConfig(temperature=1.0, max_new_tokens=8, stop_token=None)
    rollout = _tiny_rollout(lm, tok, gen, [])
    assert rollout.response_ids.shape[1] == 8 and rollout.response_mask.all()
    assert len(set(rollout.response_ids.flatten().tolist())) > 1  # nothing suppressed
    stops = resolve_stop_token_ids(tok, "e")
    rollout = _tiny_rollout(lm, tok, GenerationConfig(temperature=1.0, max_new_tokens=8), stops)
    for ids, mask in zip(rollout.response_ids, rollout.response_mask):
        assert not any(t in stops for t in ids[mask].tolist()[:-1])
    assert rollout.response_mask.sum(1).max() > 1  # rows run past their first token
    assert lm.generation_config.to_dict() == saved  # the model's own config is put back


def _sampled_ranks(lm, rollout) -> torch.Tensor:
    """(B, R) rank of each sampled token among the LM's logits at its step (0: the top one)."""
    ids = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask.long()], 1)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, rollout.query_ids.shape[1] - 1 : -1]
    sampled = logits.gather(-1, rollout.response_ids.unsqueeze(-1))
    return (logits > sampled).sum(-1)


def test_top_k_zero_samples_from_the_whole_vocabulary():
    """top_k=0 means no top-k filter (transformers would put in its default of 50 for None)."""
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    assert len(tok) == 100
    gen = GenerationConfig(temperature=20.0, top_k=0, max_new_tokens=8, stop_token=None)
    # a top-50 filter would never sample these
    assert _sampled_ranks(lm, _tiny_rollout(lm, tok, gen, [])).max() >= 60
    # and an explicit top_k still filters
    gen = GenerationConfig(temperature=20.0, top_k=5, max_new_tokens=8, stop_token=None)
    assert _sampled_ranks(lm, _tiny_rollout(lm, tok, gen, [])).max() < 5


def test_sampled_first_tokens_follow_softmax_of_logits_over_temperature():
    """End to end: the sampler draws from exactly the distribution PPO's logprobs assume."""
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    n, temperature = 4000, 2.0
    enc = tok(["p1"], return_tensors="pt")
    ids, mask = enc["input_ids"].repeat(n, 1), enc["attention_mask"].repeat(n, 1)
    gen = GenerationConfig(temperature=temperature, max_new_tokens=1, stop_token=None)
    torch.manual_seed(0)
    rollout = sample_responses(lm, tok, ids, mask, ["p1"] * n, gen, [])
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(tok)).double()
    with torch.no_grad():
        logits = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    expected = torch.softmax(logits[0, -1].double() / temperature, -1)
    total_variation = 0.5 * (counts / n - expected).abs().sum()
    # Sampling noise alone is ~0.06 here; a top-50 filter would remove the tail's mass.
    assert total_variation < 0.1, float(total_variation)
    assert expected.topk(50).values.sum() < 0.85  # the tail a top-50 filter drops is > 0.15


@pytest.mark.parametrize(
    "reshape",
    [{}, {"top_k": 5}, {"top_p": 0.9}, {"min_new_tokens": 3}],
    ids=["full", "top_k", "top_p", "min_new_tokens"],
)
def test_sampler_logprobs_are_those_of_the_distribution_sampled_from(reshape):
    """``sampler_logprobs``: the distribution drawn from (renormalised by top-k / top-p, the stop
    token masked before min_new_tokens); ``model_logprobs``: the full softmax(logits / T) that
    the losses recompute, whatever reshapes the draw."""
    from rlhf_lightning.rollout.experience import reference_logprobs

    tok = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    stops = resolve_stop_token_ids(tok, "e")
    gen = GenerationConfig(temperature=0.7, max_new_tokens=8, **reshape)
    rollout = _tiny_rollout(lm, tok, gen, stops, n=64)  # some rows stop early (padding)
    ids = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask.long()], 1)
    with torch.no_grad():
        full = reference_logprobs(lm, ids, mask, rollout.query_ids.shape[1], 0.7)
    got, model, m = rollout.sampler_logprobs, rollout.model_logprobs, rollout.response_mask
    assert got.shape == full.shape and (got[~m] == 0).all() and (model[~m] == 0).all()
    assert (~m).any()
    torch.testing.assert_close(model[m], full[m], atol=1e-4, rtol=0)
    if not reshape:  # the draw is the full softmax(logits / T) itself
        torch.testing.assert_close(got[m], full[m], atol=1e-4, rtol=0)
    else:  # renormalised: every sampled token is at least as likely as in the full softmax
        assert (got[m] >= full[m] - 1e-5).all() and (got[m] - full[m]).mean() > 0.005
    if "min_new_tokens" in reshape:
        lengths = m.sum(dim=1)
        assert (lengths >= 3).all() and (lengths < 8).any()  # stops only from the 3rd token


def test_sample_tokens_draws_from_the_given_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.3])  # two tokens of probability 0
    n = 40_000
    logprobs = probs.log().expand(n, -1)
    torch.manual_seed(0)
    drawn = sample_tokens(logprobs)
    assert drawn.shape == (n, 1) and drawn.dtype == torch.long
    frequencies = torch.bincount(drawn[:, 0], minlength=5).double() / n
    assert frequencies[1] == 0 and frequencies[3] == 0
    # ~0.003 is the sampling noise of each frequency here
    torch.testing.assert_close(frequencies, probs.double(), atol=0.012, rtol=0)
    # unnormalised log-probabilities are fine too, and a single finite entry is always drawn
    last_only = torch.full((1000, 5), float("-inf"))
    last_only[:, -1] = 3.0
    assert (sample_tokens(last_only) == 4).all()


def test_rollout_fails_if_generate_does_not_append_the_drawn_tokens(monkeypatch):
    """The sampler's tokens and the rollout's must agree, or the rollout is not the configured
    sampling (e.g. if a warper ran after ours): a clear error instead."""
    tok = load_tokenizer("builtin:tiny", padding_side="left")
    lm = load_causal_lm("builtin:tiny")
    gen = GenerationConfig(temperature=20.0, max_new_tokens=6, stop_token=None)
    draw_only = TokenSampler.__call__

    def draw_but_return_the_scores(self, input_ids, scores):
        draw_only(self, input_ids, scores)
        return scores  # generate's argmax then takes the greedy token, not the drawn one

    monkeypatch.setattr(TokenSampler, "__call__", draw_but_return_the_scores)
    with pytest.raises(RuntimeError, match="did not append the tokens"):
        _tiny_rollout(lm, tok, gen, [])


def test_token_sampler_returns_the_first_draws_when_generate_drops_a_step():
    """On GPU, generate's deferred stop check runs one step more and drops it: the draws that
    made the tokens are the first ones."""
    sampler = TokenSampler(GenerationConfig(temperature=1.0))
    scores = torch.log(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    for _ in range(3):  # every draw is forced: token 1 in row 0, token 2 in row 1
        out = sampler(torch.zeros(2, 1, dtype=torch.long), scores.clone())
        assert (out.argmax(-1) == torch.tensor([1, 2])).all()
        assert torch.isinf(out).sum() == 4  # -inf everywhere but at the drawn token
    tokens, logprobs, model_logprobs = sampler.drawn(2)
    assert tokens.tolist() == [[1, 1], [2, 2]] and (logprobs == 0).all()
    assert (model_logprobs == 0).all()
    with pytest.raises(RuntimeError, match="drew 3"):
        sampler.drawn(4)
