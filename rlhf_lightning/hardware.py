"""Defaults that depend on the device: the Trainer precision and the rollout sampling dtype.

bf16 is only fast where the hardware computes in it. A CUDA GPU with bf16 support, or a CPU with
AVX512-BF16 or AMX instructions, runs a bf16 matmul faster than an fp32 one; elsewhere PyTorch
emulates it. On an AVX2-only AMD EPYC a 1024^3 bf16 matmul ran at ~1 GFLOP/s against ~135-175 in
fp32, which made ``bf16-mixed`` training 10-50x slower. So ``trainer.precision: auto`` and
``generation.sampling_dtype: auto`` choose bf16 only where it is native, and say
which choice was made and why. The decision reads CPU feature flags (deterministic, so every rank
of a DDP job chooses alike), never a timing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache

import torch

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class Bf16Support:
    """Whether ``device_type`` computes natively in bf16, and why (a short reason for logs)."""

    device_type: str
    native: bool
    reason: str


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private helpers: absent in some torch builds
    try:
        return bool(check()) if check is not None else False
    except Exception:  # pragma: no cover - a build without the probe
        return False


@cache
def bf16_support(device_type: str) -> Bf16Support:
    """Native bf16 on ``"cpu"`` (AVX512-BF16 or AMX) or ``"cuda"`` (``is_bf16_supported``)."""
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return Bf16Support("cuda", native, f"{name}: bf16 {'supported' if native else 'not'}")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [f for f in ("avx512_bf16", "amx_tile") if _cpu_flag(f"_is_{f}_supported")]
    native = bool(flags)
    reason = f"CPU capability {capability}, " + (
        f"native bf16 ({', '.join(flags)})" if native else "no native bf16 (no AVX512-BF16/AMX)"
    )
    return Bf16Support("cpu", native, reason)


def matmul_gflops(dtype: torch.dtype, size: int = 512, seconds: float = 0.1) -> float:
    """GFLOP/s of a ``size``^3 CPU matmul in ``dtype``, timed for about ``seconds``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def accelerator_device_type(accelerator: str | None) -> str:
    """``"cuda"`` for ``gpu``/``cuda`` (and ``auto`` where CUDA is available), else ``"cpu"``."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator in (None, AUTO) and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@cache
def resolve_precision(precision: str, accelerator: str | None) -> str:
    """The Lightning precision to run with: ``auto`` becomes ``bf16-mixed`` where bf16 is native,
    else ``32-true``. An explicit value is returned unchanged, with a warning when it asks for
    bf16 on a device that emulates it. Logs the choice once per (precision, accelerator)."""
    support = bf16_support(accelerator_device_type(accelerator))
    if str(precision) == AUTO:
        chosen = "bf16-mixed" if support.native else "32-true"
        log.info("trainer.precision=auto -> %s (%s)", chosen, support.reason)
        return chosen
    if str(precision).startswith("bf16") and not support.native:
        log.warning(
            "trainer.precision=%s on a device without native bf16 (%s): bf16 matmuls are "
            "emulated there and can be 10-50x slower than fp32; trainer.precision=auto "
            "would choose 32-true",
            precision,
            support.reason,
        )
    return str(precision)


@cache
def resolve_sampling_dtype(sampling_dtype: str | None, device_type: str) -> str | None:
    """``generation.sampling_dtype``: ``auto`` becomes ``bfloat16`` where bf16 is
    native, else None (sample with the trained weights). Explicit values are kept, with a
    warning for ``bfloat16`` on a device that emulates it."""
    support = bf16_support(device_type)
    if sampling_dtype == AUTO:
        chosen = "bfloat16" if support.native else None
        log.info("generation.sampling_dtype=auto -> %s (%s)", chosen, support.reason)
        return chosen
    if sampling_dtype == "bfloat16" and not support.native:
        log.warning(
            "generation.sampling_dtype=bfloat16 on a device without native bf16 "
            "(%s): sampling will be much slower than with the float32 weights (null)",
            support.reason,
        )
    return sampling_dtype
