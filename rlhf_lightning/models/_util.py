"""Small helpers shared by the model modules: dtype names, atomic directory writes and file
permissions that honour the umask."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_lightning.errors import require

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
    check_dtype(name)
    return "auto" if name == "auto" else DTYPES[name]


def check_dtype(name: str) -> None:
    """Raise `FieldError` for ``dtype`` unless ``name`` is a dtype name `resolve_dtype` knows."""
    require(
        name == "auto" or name in DTYPES,
        "dtype",
        f"unknown dtype {name!r}; expected one of {', '.join([*DTYPES, 'auto'])}",
    )


def umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` and everything under it the permissions a plain ``open()`` / ``mkdir`` would:
    files ``0o666``, directories ``0o777``, minus the umask (0644 / 0755 with the usual 022).

    Files written atomically through a temporary file (``tempfile.mkstemp``, which safetensors'
    ``save_file`` uses) are private (0600) otherwise.
    """
    path = Path(path)
    mask = umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


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
        honour_umask(tmp_dir)  # mkdtemp creates it private (0700), safetensors files 0600
        try:
            os.replace(tmp_dir, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
