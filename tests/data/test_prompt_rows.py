"""Prompt rows beyond one text column: extra columns for the reward, and chat (`messages`) rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_lightning.data import DataValidationError, PromptDataModule
from rlhf_lightning.data.tokenize import render_chat
from rlhf_lightning.rewards import CallableReward

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def prompts_module(tokenizer, path: str, **overrides) -> PromptDataModule:
    args = dict(max_prompt_length=200, batch_size=4, eval_batch_size=4, seed=0, eval_path=path)
    return PromptDataModule(path=path, tokenizer=tokenizer, **{**args, **overrides})


def exact_match(prompts, responses, answer):
    return [float(response == expected) for response, expected in zip(responses, answer)]


# ------------------------------------------------------------------------ extra columns


def test_other_columns_reach_the_reward_as_keyword_arguments(tokenizer, tmp_path):
    rows = [
        {"prompt": "2+2=", "answer": "4", "id": 1, "meta": {"source": "x"}},
        {"prompt": "3*3=", "answer": "9", "id": 2, "meta": {"source": "y"}},
        {"prompt": "1-1=", "answer": "0", "id": 3, "meta": {"source": "z"}},
    ]
    module = prompts_module(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    module.setup()
    assert module.column_names == ["answer", "id"]  # lists and objects are not passed
    batch = next(iter(module.val_dataloader()))
    assert batch["prompts"] == ["2+2=", "3*3=", "1-1="]
    assert batch["columns"] == {"answer": ["4", "9", "0"], "id": [1, 2, 3]}
    reward = CallableReward(exact_match)
    responses = ["4", "8", "0"]
    assert reward(batch["prompts"], responses, **batch["columns"]).tolist() == [1.0, 0.0, 1.0]
    # The training batches carry them in the order of their prompts.
    loader = module.train_dataloader()
    loader.sampler.set_epoch(1)
    train_batch = next(iter(loader))
    answers = {row["prompt"]: row["answer"] for row in rows}
    assert train_batch["columns"]["answer"] == [answers[p] for p in train_batch["prompts"]]


def test_a_column_some_rows_lack_is_none_there_and_logged(tokenizer, tmp_path, caplog):
    rows = [{"prompt": "a", "answer": "x"}, {"prompt": "b"}, {"prompt": "c", "answer": ["y"]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    module = prompts_module(tokenizer, path, eval_path=write_jsonl(tmp_path / "e.jsonl", rows[:1]))
    with caplog.at_level(logging.INFO, logger="rlhf_lightning.data"):
        module.setup()
    batch = next(iter(module.train_dataloader()))
    by_prompt = dict(zip(batch["prompts"], batch["columns"]["answer"]))
    assert by_prompt == {"a": "x", "b": None, "c": None}
    assert (
        "column 'answer' is missing, or not a string, number, boolean or null, in 2 of 4 rows"
        in (caplog.text)
    )
    assert "not given to the reward (lists or objects): 'answer'" in caplog.text


def test_rows_differing_only_in_a_column_are_not_duplicates(tokenizer, tmp_path):
    rows = [{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": "2"}]
    module = prompts_module(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    module.setup()
    assert [item["columns"]["answer"] for item in module.train_items] == ["1", "2"]
    rows.append({"prompt": "q", "answer": "1"})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"row 3 \(line 3\): exact duplicate of row 1"):
        prompts_module(tokenizer, path).setup()


def test_rows_without_other_columns_give_an_empty_columns_dict(tokenizer, tmp_path):
    module = prompts_module(tokenizer, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]))
    module.setup()
    assert next(iter(module.val_dataloader()))["columns"] == {}


# ------------------------------------------------------------------------ chat rows

CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Review this film:"},
]


def test_messages_rows_are_rendered_with_the_chat_template(tokenizer, tmp_path):
    rows = [{"messages": CHAT, "answer": "a"}, {"prompt": "plain text", "answer": "b"}]
    module = prompts_module(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    module.setup()
    items = {item["prompt"]: item for item in module.train_items}
    chat_item = items["Review this film:"]  # reward sources see the last user message
    expected = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat_item["input_ids"] == render_chat(tokenizer, CHAT).token_ids
    assert tokenizer.decode(chat_item["input_ids"]) == expected
    assert expected.startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    assert expected.endswith("<|im_start|>assistant\n")
    assert chat_item["columns"] == {"answer": "a"}
    plain = items["plain text"]["input_ids"]  # text rows are unchanged without chat_template
    assert plain == tokenizer("plain text", add_special_tokens=False)["input_ids"]


def test_messages_rows_keep_special_token_text_in_contents_as_text(tokenizer, tmp_path):
    chat = [{"role": "user", "content": "end<|im_end|>"}]
    module = prompts_module(tokenizer, write_jsonl(tmp_path / "p.jsonl", [{"messages": chat}]))
    module.setup()
    (item,) = module.train_items
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert item["input_ids"].count(im_end) == 1  # the template's, after the content


BAD_CHATS = {
    "not a list": ("hello", r"column 'messages' must be a list of messages, got str 'hello'"),
    "empty": ([], r"column 'messages' must be a list of messages, got an empty list"),
    "not an object": (
        ["hi"],
        r"column 'messages', message 1 must be an object with 'role' and 'content', got str",
    ),
    "unknown role": (
        [{"role": "human", "content": "hi"}],
        r"column 'messages', message 1 has role 'human'; a role is one of 'system', 'user', "
        r"'assistant'",
    ),
    "no role": ([{"content": "hi"}], r"column 'messages', message 1 has role None"),
    "content not a string": (
        [{"role": "system", "content": "x"}, {"role": "user", "content": ["hi"]}],
        r"column 'messages', message 2 must have a string 'content', got list \['hi'\]",
    ),
    "last from the assistant": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        r"column 'messages': the last message must be from the user, got 'assistant'",
    ),
    "blank last message": (
        [{"role": "user", "content": "  "}],
        r"column 'messages': the last message is empty or whitespace only",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_bad_messages_name_the_file_and_row(tokenizer, tmp_path, case):
    messages, message = BAD_CHATS[case]
    rows = [{"prompt": "a"}, {"messages": messages}, {"prompt": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataValidationError, match=rf"p\.jsonl, row 2 \(line 2\): {message}"):
        prompts_module(tokenizer, path).setup()
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "e"}])
    module = prompts_module(tokenizer, path, on_bad_row="skip", eval_path=evaluation)
    module.setup()
    reason = "empty_text" if case == "blank last message" else "bad_messages"
    assert module.skipped == {reason: 1}
    assert [item["prompt"] for item in module.train_items] == ["a", "b"]


def test_a_row_with_both_prompt_and_messages_is_ambiguous(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "messages": CHAT}])
    expected = r"row 1 \(line 1\): has both 'prompt' and 'messages': which is the prompt\?"
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, path).setup()
    module = prompts_module(tokenizer, path, messages_column=None)  # then it is a text row
    module.setup()
    assert module.train_items[0]["prompt"] == "a"
    assert "messages" not in module.train_items[0]["columns"]  # a list: not passed


def test_a_row_with_neither_names_both_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}])
    expected = (
        r"row 1 \(line 1\): missing column 'prompt' \(found columns: 'text'; a chat row has "
        r"'messages' instead\)"
    )
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, path).setup()
    with pytest.raises(DataValidationError, match=r"missing column 'prompt' \(found columns: 'te"):
        prompts_module(tokenizer, path, messages_column=None).setup()


def test_chat_rows_refuse_settings_that_cannot_apply(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"messages": CHAT}])
    for setting in ({"template": "Q: {prompt}"}, {"prefix_tokens": [1, 2]}):
        with pytest.raises(DataValidationError, match=r"row 2 \(line 2\): a chat \('messages'\)"):
            prompts_module(tokenizer, path, **setting).setup()
    tokenizer.chat_template = None
    expected = r"row 2 \(line 2\): a chat \('messages'\) row, but tokenizer .* no chat template"
    with pytest.raises(DataValidationError, match=expected):
        prompts_module(tokenizer, path).setup()
    with pytest.raises(ValueError, match="set use_chat_template: false"):
        prompts_module(tokenizer, path, chat_template=True)


@pytest.mark.parametrize("name", ["tiny", "sentiment", "imdb"])
def test_prompt_configs_name_the_messages_column(name):
    config = OmegaConf.load(REPO / "conf" / "data" / "prompts" / f"{name}.yaml")
    assert config.messages_column == "messages"
