"""Shared test setup: fully offline, a throwaway framework cache, and the tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
