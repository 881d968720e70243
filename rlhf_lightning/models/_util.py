"""Small helpers shared by the model modules: dtype names and atomic directory writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name ("float32", "bfloat16", "float16", "auto") to what `from_pretrained` takes.

    "auto" is passed through (the checkpoint's own dtype); a `torch.dtype` is accepted as is.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {[*DTYPES, 'auto']}")
    return DTYPES[name]


def write_directory_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create directory `target` by calling `write(tmp_dir)` and renaming `tmp_dir` into place.

    The temporary directory lives next to `target`, so the final `os.replace` is atomic: after a
    crash either the complete directory exists or none does (a stray hidden `.tmp` directory may
    remain). If `target` already exists (for instance another process won the race), it is kept
    and the freshly written copy is discarded.
    """
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp_dir)
        tmp_dir.chmod(0o755)  # mkdtemp creates it private (0700)
        try:
            os.replace(tmp_dir, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
