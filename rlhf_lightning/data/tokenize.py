"""Tokenising user text so that it never turns into special tokens.

Text from data files and command lines is the user's: the characters `<|im_end|>` in a prompt are
characters, not the tokenizer's end-of-turn token. Tokenizers read special-token text as the
special token by default; `encode_text` tokenises with `split_special_tokens=True` instead, which
keeps the special tokens the tokenizer adds itself (`add_special_tokens`, e.g. a BOS).
`render_chat` renders messages with the tokenizer's chat template so that the template's own
special tokens (turn markers, a BOS it writes) stay special and only the messages' contents are
tokenised as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Private-use characters mark where each message's content goes in a template's rendering.
_CONTENT_MARKER = "\ue000{}\ue001"


def encode_text(
    tokenizer, texts: Sequence[str], add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each text, special-token text tokenised as plain text (see module doc)."""
    encoded = tokenizer(
        list(texts), add_special_tokens=add_special_tokens, split_special_tokens=True
    )
    return encoded["input_ids"]


class ChatPrompt(str):
    """A conversation rendered with a chat template: the text, and its `token_ids` (in which only
    the template's tokens are special). `encode_prompts` uses the ids instead of the text."""

    token_ids: list[int]

    def __new__(cls, text: str, token_ids: list[int]) -> ChatPrompt:
        prompt = super().__new__(cls, text)
        prompt.token_ids = list(token_ids)
        return prompt

    def __getnewargs__(self) -> tuple[str, list[int]]:  # copy and pickle keep the ids
        return str(self), self.token_ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict[str, str]]) -> ChatPrompt:
    """`messages` ({"role", "content"} dicts) rendered with the tokenizer's chat template and the
    assistant generation prompt, tokenised without adding special tokens (the template writes
    any it needs).

    The template is rendered with a marker in place of each content, its text is tokenised
    with its special tokens, and the contents are tokenised as plain text; the token ids are
    those of tokenising the whole rendering (the tokenizer, too, splits text at special tokens
    before anything else) except that special-token text in a content stays text. Raises
    ValueError when the tokenizer has no chat template, or when the template does not insert
    each content exactly once and unchanged (then its own text cannot be told from the user's).
    """
    if not has_chat_template(tokenizer):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    markers = [_CONTENT_MARKER.format(i) for i in range(len(messages))]
    marked = [
        {"role": message["role"], "content": marker}
        for message, marker in zip(messages, markers, strict=True)
    ]
    rest = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    pieces = []  # the template's text before each content, then after the last
    for marker in markers:
        before, found, rest = rest.partition(marker)
        if not found or marker in rest:
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} does not insert each message's "
                "content once and unchanged, so its own special tokens cannot be told from the "
                "user's text"
            )
        pieces.append(before)
    pieces.append(rest)

    special = _special_token_pattern(tokenizer)
    segments: list[str | int] = [""]  # plain text (str) and special token ids (int), in order
    for index, piece in enumerate(pieces):
        parts = special.split(piece) if special else [piece]
        for position, part in enumerate(parts):  # text, special token, text, ...
            if position % 2:
                segments.append(tokenizer.convert_tokens_to_ids(part))
            elif isinstance(segments[-1], str):
                segments[-1] += part
            else:
                segments.append(part)
        if index < len(messages):
            content = messages[index]["content"]
            if isinstance(segments[-1], str):
                segments[-1] += content
            else:
                segments.append(content)
    texts = [segment for segment in segments if isinstance(segment, str) and segment]
    encoded = iter(encode_text(tokenizer, texts, add_special_tokens=False) if texts else [])
    token_ids: list[int] = []
    for segment in segments:
        if isinstance(segment, int):
            token_ids.append(segment)
        elif segment:
            token_ids += next(encoded)
    contents = [message["content"] for message in messages]
    text = "".join(piece + content for piece, content in zip(pieces, [*contents, ""]))
    return ChatPrompt(text, token_ids)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt: a `ChatPrompt`'s own ids; any other text by `encode_text`.

    Raises ValueError naming the prompt for text that is not valid Unicode (a lone UTF-16
    surrogate, e.g. from a JSON escape or an undecodable command-line byte), which no tokenizer
    can encode.
    """
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"prompt {number} holds a lone UTF-16 surrogate "
                f"\\u{ord(prompt[error.start]):04x} (character {error.start + 1}), which is not "
                "valid Unicode"
            ) from None
    plain = [prompt for prompt in prompts if not isinstance(prompt, ChatPrompt)]
    encoded = iter(encode_text(tokenizer, plain) if plain else [])
    return [
        list(prompt.token_ids) if isinstance(prompt, ChatPrompt) else next(encoded)
        for prompt in prompts
    ]


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex with one group matching any special token's text, longest first; None if none."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    texts = sorted({token.content for token in added if token.special}, key=len, reverse=True)
    if not texts:
        return None
    return re.compile("(" + "|".join(re.escape(text) for text in texts) + ")")
