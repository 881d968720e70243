"""`builtin:tiny`: a tiny random Llama with a character-level tokenizer, built without downloads.

The tokenizer has one token per printable ASCII character plus newline, and four special tokens
with SmolLM2's ids and roles: `<|endoftext|>` (0, pad), `<|im_start|>` (1, bos), `<|im_end|>`
(2, eos), and `<unk>` (3) for any other character. Like SmolLM2, pad differs from eos and no bos
is prepended automatically. A minimal ChatML chat template is included.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = ("\n", *(chr(code) for code in range(32, 127)))

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_LLAMA_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def build_char_tokenizer():
    """Return the character-level `PreTrainedTokenizerFast` described in the module docstring."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    # BPE without merges splits text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHATML_TEMPLATE,
    )


def make_tiny_model_dir(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny random `LlamaForCausalLM` and its tokenizer to `path` as a HF directory.

    The weights depend only on `seed` (and `overrides`). `overrides` replace fields of the
    `LlamaConfig` (defaults in `TINY_LLAMA_CONFIG`), e.g. `hidden_size=64`. Returns `path`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    special_ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlamaConfig(**{**special_ids, **TINY_LLAMA_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    tokenizer.model_max_length = config.max_position_embeddings
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
