"""Scalar reward model: a transformer backbone plus a linear head on the last real token.

Saved layout (`save_pretrained`), flat so that the directory is also a plain HF backbone dir:

    config.json, model.safetensors    the backbone (`backbone.save_pretrained`)
    tokenizer files                   the tokenizer the model was trained with
    reward_head.safetensors           `head.weight` (1, d), `head.bias` (1,), `gain` (), `bias` ()
    reward_model.json                 format version, backbone class, hidden size, gain, bias

`reward_head.safetensors` is authoritative; the gain and bias in `reward_model.json` are a
readable copy.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.models.loading import disable_dropout, load_backbone, load_tokenizer
from rlhf_lightning.models.masking import last_token_index, position_ids_from_mask

FORMAT_VERSION = 1
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
    Dropout is disabled in the backbone.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
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
        cls, name_or_path: str | os.PathLike, dtype: str = "float32", **load_kw
    ) -> ScalarRewardModel:
        """A fresh reward model on a pretrained backbone (`load_backbone` arguments)."""
        return cls(load_backbone(name_or_path, dtype=dtype, **load_kw))

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
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path / METADATA_FILE}: unsupported format_version "
                f"{metadata.get('format_version')!r} (this version reads {FORMAT_VERSION})"
            )
        model = cls(load_backbone(path, dtype=dtype, **load_kw))
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
