"""Rollout generation helpers: the EOS trick and stop tokens."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.rollout.generation import (
    resolve_stop_token_ids,
    sample_responses,
    sampling_copy,
    truncate_after_stop,
)
from rlhf_lightning.schedules import warmup_decay_lambda

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


def test_warmup_then_linear_decay_to_zero():
    f = warmup_decay_lambda(total_steps=10, warmup_steps=2, decay="linear")
    assert [round(f(s), 4) for s in range(11)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
        0.0,
    ]
    g = warmup_decay_lambda(total_steps=4, decay="constant")
    assert [g(s) for s in range(4)] == [1.0] * 4


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
