"""Shared test setup: fully offline, a throwaway framework cache, and the tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

# Set before any test module imports transformers / huggingface_hub, which read them on import.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"


@pytest.fixture(scope="session", autouse=True)
def rlhf_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point `$RLHF_LIGHTNING_CACHE` at a fresh directory for the whole session."""
    cache = tmp_path_factory.mktemp("rlhf_lightning_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_LIGHTNING_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_model_dir(rlhf_cache_dir: Path) -> Path:
    """The `builtin:tiny` model + tokenizer directory, written once per session."""
    from rlhf_lightning.models import resolve_model_source

    path, _ = resolve_model_source("builtin:tiny")
    return Path(path)


# The tiny model, reward backbone and data of the fast task tests, without a progress bar.
TINY_MODELS = [
    "policy=tiny",
    "reward_backbone=tiny",
    "data/prompts=tiny",
    "data/preferences=tiny",
    "trainer.enable_progress_bar=false",
]
# A PPO budget of a few seconds: 8 rollouts in 2 minibatches of 2 micro-batches, 2 iterations.
TINY_BUDGET = [
    "budget.num_iterations=2",
    "budget.rollout_batch_size=8",
    "budget.minibatch_size=4",
    "budget.micro_batch_size=2",
]


def compose_config(overrides: Sequence[str] = (), hydra_config: bool = False) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` as ``rlhf-train`` would (with Hydra's own
    config under ``hydra`` when ``hydra_config``), outside any Hydra run."""
    from hydra import compose, initialize_config_dir

    from rlhf_lightning.cli.train import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture
def tokenizer():
    """The tiny character tokenizer (one token per printable character, a ChatML template)."""
    from rlhf_lightning.models.tiny import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def bos_tokenizer():
    """The tiny tokenizer adding <|im_start|> (1) before and <|im_end|> (2) after every text."""
    from tokenizers import processors

    from rlhf_lightning.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>",
        special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)],
    )
    return tokenizer


@pytest.fixture
def one_thread():
    """One OpenMP thread: on tiny tensors a second one only adds synchronisation (the exact
    enumerations of the estimator audit run 10x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
