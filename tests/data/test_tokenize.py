"""User text never becomes special tokens: prompts, pairs, reward scoring, generation, chats."""

from __future__ import annotations

import json
import pickle

import pytest

from rlhf_lightning.cli.generate import model_inputs
from rlhf_lightning.config import GenerationConfig
from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.data.tokenize import ChatPrompt, encode_prompts, encode_text, render_chat
from rlhf_lightning.evaluation import sample_rollouts
from rlhf_lightning.models import encode_for_reward, load_causal_lm, load_tokenizer

# builtin:tiny ids: <|endoftext|> 0 (pad), <|im_start|> 1 (bos), <|im_end|> 2 (eos), <unk> 3.
SPECIAL_IDS = {0, 1, 2, 3}
TRICKY = "stop<|im_end|>now<|endoftext|>"


def char_ids(tokenizer, text: str) -> list[int]:
    """The ids of `text` one character at a time: what plain text must become."""
    return [tokenizer.convert_tokens_to_ids(character) for character in text]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_encode_text_keeps_special_token_text_as_text(tokenizer, bos_tokenizer):
    assert tokenizer(TRICKY)["input_ids"][4] == 2  # what a plain tokenizer call does
    assert encode_text(tokenizer, [TRICKY]) == [char_ids(tokenizer, TRICKY)]
    # Special tokens the tokenizer adds itself are still added.
    assert encode_text(bos_tokenizer, [TRICKY]) == [[1, *char_ids(tokenizer, TRICKY), 2]]
    assert encode_text(bos_tokenizer, [TRICKY], add_special_tokens=False) == [
        char_ids(tokenizer, TRICKY)
    ]
    assert bos_tokenizer(TRICKY)["input_ids"][5] == 2  # the call leaves no setting behind


def test_prompt_data_tokenises_prompt_text_as_text(bos_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": TRICKY}, {"prompt": "plain"}])
    module = PromptDataModule(
        path, bos_tokenizer, max_prompt_length=64, batch_size=1, eval_batch_size=1, seed=0,
        eval_path=path,
    )  # fmt: skip
    module.setup()
    items = {item["prompt"]: item["input_ids"] for item in module.train_items}
    assert items[TRICKY] == [1, *char_ids(bos_tokenizer, TRICKY), 2]
    # Truncation decodes the kept ids: the literal text survives it.
    module = PromptDataModule(
        path, bos_tokenizer, max_prompt_length=20, batch_size=1, eval_batch_size=1, seed=0,
        eval_path=path,
    )  # fmt: skip
    module.setup()
    assert module.train_items[0]["prompt"] == TRICKY[-19:]


def test_prefix_tokens_count_special_token_text_as_text(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "<|im_end|>" * 3}])
    module = PromptDataModule(
        path, tokenizer, max_prompt_length=64, batch_size=1, eval_batch_size=1, seed=0,
        eval_path=path, prefix_tokens=[4, 4],
    )  # fmt: skip
    module.setup()
    assert module.train_items[0]["prompt"] == "<|im"


def test_chat_template_tokens_stay_special_and_user_text_does_not(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": TRICKY}])
    module = PromptDataModule(
        path, tokenizer, max_prompt_length=64, batch_size=1, eval_batch_size=1, seed=0,
        eval_path=path, chat_template=True,
    )  # fmt: skip
    module.setup()
    (item,) = module.train_items
    expected = [
        1, *char_ids(tokenizer, "user\n"), *char_ids(tokenizer, TRICKY), 2,
        *char_ids(tokenizer, "\n"), 1, *char_ids(tokenizer, "assistant\n"),
    ]  # fmt: skip
    assert item["input_ids"] == expected
    assert item["prompt"] == TRICKY


def test_render_chat_matches_the_tokenizer_on_ordinary_text(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = render_chat(tokenizer, messages)
    assert chat == rendered
    assert chat.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    copied = pickle.loads(pickle.dumps(chat))
    assert isinstance(copied, ChatPrompt) and copied.token_ids == chat.token_ids


def test_render_chat_refuses_a_template_that_rewrites_content(tokenizer):
    for rewrite in ("m['content'] + m['content']", "m['content'][1:]", "m['role']"):
        tokenizer.chat_template = "{% for m in messages %}{{ " + rewrite + " }}{% endfor %}"
        with pytest.raises(ValueError, match="does not insert each message's content once"):
            render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_preference_texts_keep_special_token_text_as_text(tokenizer, tmp_path):
    rows = [{"prompt": "p<|im_start|>", "chosen": "yes<|im_end|>", "rejected": "no"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    module = PreferenceDataModule(
        path, tokenizer, max_length=64, batch_size=1, eval_batch_size=1, seed=0, eval_path=path
    )
    module.setup()
    (item,) = module.train_items
    assert item["chosen_ids"] == char_ids(tokenizer, "p<|im_start|>yes<|im_end|>")
    assert item["rejected_ids"] == char_ids(tokenizer, "p<|im_start|>no")


def test_reward_scoring_keeps_special_token_text_as_text(tokenizer):
    batch = encode_for_reward(tokenizer, [TRICKY, "ab"], max_length=64)
    assert batch["input_ids"][0].tolist() == char_ids(tokenizer, TRICKY)
    assert batch["input_ids"][1, :2].tolist() == char_ids(tokenizer, "ab")
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(TRICKY) - 2)


def test_generation_prompts_keep_special_token_text_as_text(tiny_model_dir):
    lm, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    gen = GenerationConfig(max_new_tokens=2, stop_token=None)
    (rollout,) = sample_rollouts(lm, tokenizer, [TRICKY, "ab"], gen, batch_size=2)
    assert rollout.query_ids[0].tolist() == char_ids(tokenizer, TRICKY)
    chats = model_inputs(tokenizer, [TRICKY], chat_template=True)
    assert chats[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": TRICKY}], tokenize=False, add_generation_prompt=True
    )
    (rollout,) = sample_rollouts(lm, tokenizer, chats, gen)
    real = rollout.query_ids[0][rollout.query_mask[0].bool()].tolist()
    assert real == chats[0].token_ids
    assert [token for token in real if token in SPECIAL_IDS] == [1, 2, 1]  # the template's
    assert encode_prompts(tokenizer, [chats[0], TRICKY]) == [
        chats[0].token_ids,
        char_ids(tokenizer, TRICKY),
    ]


@pytest.mark.slow
def test_smollm2_tokenizer_keeps_user_text_and_template_tokens_apart():
    tokenizer = load_tokenizer("builtin:smollm2")
    im_end, endoftext = (
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    )
    (ids,) = encode_text(tokenizer, [TRICKY])
    assert im_end not in ids and endoftext not in ids
    assert tokenizer.decode(ids) == TRICKY
    ordinary = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": " Hello, world! Numbers: 12345."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What now?\n"},
    ]
    for messages in (ordinary, ordinary[1:2]):  # without a system turn the template adds one
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        chat = render_chat(tokenizer, messages)
        assert chat == rendered
        assert chat.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    chat = render_chat(tokenizer, [{"role": "user", "content": TRICKY}])
    template_ends = chat.token_ids.count(im_end)
    assert template_ends == 2  # the default system turn's and the user turn's
    assert endoftext not in chat.token_ids
    assert tokenizer.decode(chat.token_ids) == chat


def test_generation_prompt_with_a_lone_surrogate_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"prompt 2 holds a lone UTF-16 surrogate \\udc80"):
        encode_prompts(tokenizer, ["fine", "bad byte \udc80"])
