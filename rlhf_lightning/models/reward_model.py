"""Scalar reward model: a transformer backbone plus a linear head on the last real token.

Saved layout (`save_pretrained`), flat so that the directory is also a plain HF backbone dir:

    config.json, model.safetensors    the backbone (`backbone.save_pretrained`)
    tokenizer files                   the tokenizer the model was trained with
    reward_head.safetensors           `head.weight` (1, d), `head.bias` (1,), `gain` (), `bias` ()
    reward_model.json                 format version, backbone class, hidden size, gain, bias,
                                      text_format (joiner, max_length)

`reward_head.safetensors` is authoritative; the gain and bias in `reward_model.json` are a
readable copy. `text_format` is the `RewardTextFormat` the model was trained with: scoring
(`score_pairs`, `LearnedReward`) reads the same token ids for a (prompt, response) pair as
training did. Format version 1 (before the text format was stored) still loads, with
`text_format` None: such a model can serve as a critic but not be scored.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.data.padding import pad_token_ids, require_pad_token_id
from rlhf_lightning.data.preferences import RewardTextFormat
from rlhf_lightning.errors import UserError
from rlhf_lightning.models.loading import disable_dropout, load_backbone, load_tokenizer
from rlhf_lightning.models.masking import last_token_index, position_ids_from_mask

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
HEAD_FILE = "reward_head.safetensors"
METADATA_FILE = "reward_model.json"
BACKBONE_FILES = ("config.json", "model.safetensors")


def backbone_last_hidden_state(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states of a bare transformer (`AutoModel`).

    input_ids, attention_mask: (B, T) -> (B, T, d). Position ids default to positions counted
    over real tokens (`position_ids_from_mask`), so left- and right-padded rows score alike;
    they are not passed to backbones whose forward takes none (e.g. DistilBERT).
    """
    kwargs = {}
    if "position_ids" in inspect.signature(backbone.forward).parameters:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        kwargs["position_ids"] = position_ids
    output = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return output.last_hidden_state


class ScalarRewardModel(nn.Module):
    """Backbone + `nn.Linear(d, 1)` (float32) read at each row's last real token.

    The head is initialised N(0, 1/sqrt(d + 1)) with zero bias. Buffers `gain` and `bias` hold an
    affine normalisation (`gain * raw + bias`) fitted after training and applied on request.
    Dropout is disabled in the backbone. `text_format` (a `RewardTextFormat`, default: no
    joiner, 512 tokens) says how a (prompt, response) pair becomes its input; training sets it
    from the preference data, and it is saved with the model.
    """

    def __init__(self, backbone: nn.Module, text_format: RewardTextFormat | None = None):
        super().__init__()
        self.text_format = RewardTextFormat() if text_format is None else text_format
        self.backbone = disable_dropout(backbone)
        hidden_size = backbone.config.hidden_size
        device = next(backbone.parameters()).device
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.tensor(1.0, device=device))
        self.register_buffer("bias", torch.tensor(0.0, device=device))

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False
    ) -> torch.Tensor:
        """Score each row. input_ids, attention_mask: (B, T) -> (B,) float32.

        Works with left or right padding. `normalize=True` returns `gain * raw + bias`.
        """
        hidden = backbone_last_hidden_state(self.backbone, input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last_hidden = hidden[rows, last_token_index(attention_mask)]  # (B, d)
        with torch.autocast(device_type=last_hidden.device.type, enabled=False):  # fp32 head
            scores = self.head(last_hidden.float()).squeeze(-1)
        if normalize:
            scores = self.gain * scores + self.bias
        return scores

    def set_normalization(self, gain: float, bias: float) -> None:
        """Set the affine map applied by `forward(..., normalize=True)`."""
        if not (math.isfinite(gain) and math.isfinite(bias)):
            raise ValueError(f"gain and bias must be finite, got gain={gain}, bias={bias}")
        self.gain.fill_(gain)
        self.bias.fill_(bias)

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        dtype: str = "float32",
        text_format: RewardTextFormat | None = None,
        **load_kw,
    ) -> ScalarRewardModel:
        """A fresh reward model on a pretrained backbone (`load_backbone` arguments)."""
        return cls(load_backbone(name_or_path, dtype=dtype, **load_kw), text_format)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer) -> Path:
        """Write the layout described in the module docstring to `out_dir`; returns it."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        self.backbone.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        tensors = {
            "head.weight": self.head.weight,
            "head.bias": self.head.bias,
            "gain": self.gain,
            "bias": self.bias,
        }
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        save_file(tensors, out_dir / HEAD_FILE)
        metadata = {
            "format_version": FORMAT_VERSION,
            "backbone_class": type(self.backbone).__name__,
            "hidden_size": self.head.in_features,
            "gain": self.gain.item(),
            "bias": self.bias.item(),
            "text_format": asdict(self.text_format),
        }
        (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        return out_dir

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: str = "float32", **load_kw
    ) -> ScalarRewardModel:
        """Load a directory written by `save_pretrained`."""
        from safetensors.torch import load_file

        path = Path(path)
        _check_complete(path)
        metadata = json.loads((path / METADATA_FILE).read_text())
        if metadata.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{path / METADATA_FILE}: unsupported format_version "
                f"{metadata.get('format_version')!r} (this version reads "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
            )
        model = cls(load_backbone(path, dtype=dtype, **load_kw))
        model.text_format = _read_text_format(path / METADATA_FILE, metadata)
        if model.head.in_features != metadata["hidden_size"]:
            raise ValueError(
                f"{path}: backbone hidden size {model.head.in_features} does not match "
                f"hidden_size {metadata['hidden_size']} in {METADATA_FILE}"
            )
        head_state = load_file(path / HEAD_FILE)
        model.head.load_state_dict(
            {"weight": head_state["head.weight"], "bias": head_state["head.bias"]}
        )
        model.set_normalization(head_state["gain"].item(), head_state["bias"].item())
        return model


def _read_text_format(where: Path, metadata: dict) -> RewardTextFormat | None:
    """The stored `RewardTextFormat`, every field given (None in format version 1, which did
    not store it)."""
    if metadata["format_version"] == 1:
        return None
    stored = metadata.get("text_format")
    fields = {"joiner", "max_length"}
    try:
        if not isinstance(stored, dict) or set(stored) != fields:
            raise ValueError(f"needs exactly the keys {sorted(fields)}")
        return RewardTextFormat(**stored)
    except ValueError as error:
        raise ValueError(
            f'{where}: text_format must be {{"joiner": str, "max_length": int}}, got '
            f"{stored!r} ({error})"
        ) from None


def _check_complete(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"reward model directory not found: {path}")
    required = (*BACKBONE_FILES, HEAD_FILE, METADATA_FILE)
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a complete reward model directory: missing {', '.join(missing)} "
            "(write it with ScalarRewardModel.save_pretrained)"
        )


def load_reward_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a reward model, right-padded for scoring."""
    return load_tokenizer(path, padding_side="right")


def encode_for_reward(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise texts for scoring: right padding, truncation from the left (keeps the ending).

    Special-token text in the texts (e.g. a literal "<|im_end|>") is tokenised as text, as the
    preference data is; the tokenizer still adds its own special tokens. Returns `input_ids`,
    `attention_mask`: (B, T) with T <= max_length. The tokenizer's own settings are left
    unchanged.
    """
    saved_truncation_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        encoded = tokenizer(
            texts,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=max_length,
            split_special_tokens=True,
            return_tensors="pt",
        )
    finally:
        tokenizer.truncation_side = saved_truncation_side
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class UnscorableRewardModelError(UserError, ValueError):
    """A reward model saved without the text format it was trained with."""


def check_scorable(model: ScalarRewardModel, where: str | os.PathLike | None = None) -> None:
    """Raise `UnscorableRewardModelError` (naming ``where``, the model's directory) when the model
    has no text format (format version 1): nothing says how it read its inputs."""
    if model.text_format is None:
        raise UnscorableRewardModelError(
            f"{where or 'the reward model'}: {METADATA_FILE} has no text_format (it was written "
            "before the joiner and max_length were stored with the model); add "
            '"text_format": {"joiner": ..., "max_length": ...} with the values of the '
            "preference data it was trained on (conf/data/preferences), or train it again"
        )


def encode_pairs(
    tokenizer, text_format: RewardTextFormat, prompts: Sequence[str], responses: Sequence[str]
) -> dict[str, torch.Tensor]:
    """`text_format`'s token ids of the pairs, right-padded: `input_ids`, `attention_mask`
    (B, T) long with T <= max_length; row i is exactly ``text_format.token_ids(...)[i]``."""
    ids = text_format.token_ids(tokenizer, prompts, responses)
    input_ids, attention_mask = pad_token_ids(ids, require_pad_token_id(tokenizer), "right")
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def score_pairs(
    model: ScalarRewardModel,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
    normalize: bool = False,
    where: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Rewards of (prompt, response) pairs read as the model was trained to read them (its
    `text_format`): N pairs -> (N,) float32 on CPU; normalised (`gain * raw + bias`) on request.

    The model runs in eval mode on its own device and is left in the mode it was in. A model
    without a text format fails `check_scorable`.
    """
    check_scorable(model, where)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = [torch.zeros(0)]
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        batch = encode_pairs(
            tokenizer, model.text_format, prompts[start:stop], responses[start:stop]
        )
        scores.append(
            model(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                normalize=normalize,
            )
            .float()
            .cpu()
        )
    model.train(was_training)
    return torch.cat(scores)
