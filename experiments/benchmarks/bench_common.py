"""Helpers shared by ``bench_ppo.py`` and ``bench_trl.py``: memory, matmul peak, FLOPs, output.

Imports only torch and the standard library, so ``bench_trl.py`` can use it from a venv that has
TRL but not rlhf_lightning.

Definitions used by both benchmarks:

- **peak RSS (process)**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the high-water mark of
  the process's resident memory over its whole life (model loading included).
- **peak RSS (timed)**: the largest current RSS (``/proc/self/statm``) seen by a thread sampling
  every 20 ms during the timed iterations only.
- **peak GPU memory**: ``torch.cuda.max_memory_allocated`` over the timed iterations (reset after
  the warm-up iterations).
- **matmul peak**: the best FLOP/s of ``reps`` timed ``(n x n) @ (n x n)`` products in the run's
  compute dtype on the run's device with the run's thread count (2 n^3 FLOP each).
- **FLOP estimate** (Kaplan et al. 2020): a forward pass costs ``2 * N * tokens``, forward +
  backward ``6 * N * tokens``, where N counts each model's parameters once (tied input/output
  embeddings once: that stands for the LM-head matmul) and tokens are the padded
  ``B * (P + R)`` positions the model processes. Attention-score FLOPs are ignored (sequences
  here are ~60 tokens).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

TABLE_COLUMNS = (
    "framework",
    "policy",
    "reward",
    "device",
    "precision",
    "B/mb/micro/epochs",
    "resp len",
    "s/iter",
    "gen s",
    "exp s",
    "update s",
    "gen tok/s",
    "train tok/s",
    "peak RSS GiB (proc/timed)",
    "MFU",
    "score first->last",
)


def set_threads(threads: int | None) -> None:
    """Intra-op threads for torch (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_bytes() -> int:
    """High-water mark of this process's RSS (``ru_maxrss``: kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def current_rss_bytes() -> int:
    """Current RSS from ``/proc/self/statm`` (falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


class RSSSampler:
    """Samples the current RSS in a daemon thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss_bytes())


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a run use: bf16 under ``bf16*`` precision, else fp32."""
    return torch.bfloat16 if precision.startswith("bf16") else torch.float32


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, size: int = 2048, reps: int = 5
) -> dict:
    """Best FLOP/s of ``reps`` square matmuls of ``size`` (after one untimed warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * size**3
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "reps": reps,
        "best_s": min(times),
        "median_s": sorted(times)[len(times) // 2],
        "flops": flop / min(times),
    }


def count_params(*modules) -> int:
    """Parameters of the given modules, each tensor counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def add_save_arguments(parser) -> None:
    """``--save-every K --save-dir DIR``: export the policy for the reward-reached evaluation."""
    parser.add_argument(
        "--save-every",
        type=int,
        default=0,
        metavar="K",
        help="save the policy (a plain HF dir) to SAVE_DIR/iter_NNN every K iterations and after "
        "the last one (0: never); saving is not timed",
    )
    parser.add_argument("--save-dir", default=None, help="where --save-every writes")


def check_save_arguments(parser, args) -> None:
    if args.save_every < 0:
        parser.error("--save-every must be >= 0")
    if args.save_every and not args.save_dir:
        parser.error("--save-every needs --save-dir")


def save_due(args, done: int, total: int) -> bool:
    """Whether to save after ``done`` of ``total`` iterations (every ``--save-every`` and last)."""
    return bool(args.save_every) and (done % args.save_every == 0 or done == total)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table_header() -> str:
    return "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS)


def table_row(result: dict) -> str:
    """One markdown row of TABLE_COLUMNS from a benchmark result dict."""
    s = result["summary"]
    a = result["args"]
    timed_rss = gib(s.get("peak_rss_timed_bytes"))
    mem = f"{gib(s['peak_rss_process_bytes']):.2f} / {timed_rss:.2f}" if timed_rss else "-"
    if s.get("peak_gpu_bytes") is not None:
        mem += f" (GPU {gib(s['peak_gpu_bytes']):.2f})"
    scores = s.get("scores") or []
    score = f"{scores[0]:.3f} -> {scores[-1]:.3f}" if scores else "-"
    mfu = s.get("mfu")
    cells = [
        result["framework"],
        Path(str(a["policy"])).name,
        a["reward"],
        f"{a['device']} x{a['threads']}" if a.get("threads") else a["device"],
        a["precision"],
        f"{a['batch']}/{a['minibatch']}/{a['micro']}/{a['epochs']}",
        f"{s['response_length_mean']:.1f}",
        s["iteration_s"],
        s["rollout_s"],
        s["experience_s"],
        s["update_s"],
        s["generated_tokens_per_s"],
        s["trained_tokens_per_s"],
        mem,
        None if mfu is None else f"{100 * mfu:.2f}%",
        score,
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def phase_summary(iterations: list[dict], peak_flops: float) -> dict:
    """Aggregate per-iteration records (times, tokens, FLOPs) over the timed iterations.

    Each record has ``rollout_s``, ``experience_s``, ``update_s``, ``iteration_s``,
    ``generated_tokens``, ``trained_tokens``, ``flop_rollout``, ``flop_experience``,
    ``flop_update``, ``response_length`` and optionally ``score``. Rates are total tokens
    (FLOPs) over total time, not means of per-iteration rates.
    """

    def total(key: str) -> float:
        return sum(float(it[key]) for it in iterations)

    phases = ("rollout", "experience", "update")
    time_total = {p: total(f"{p}_s") for p in phases}
    flop_total = {p: total(f"flop_{p}") for p in phases}
    iter_total = total("iteration_s")
    achieved = {p: flop_total[p] / max(time_total[p], 1e-12) for p in phases}
    all_flop = sum(flop_total.values())
    phase_time = sum(time_total.values())
    n = len(iterations)
    return {
        "timed_iterations": n,
        "iteration_s": iter_total / n,
        "iteration_s_min": min(float(it["iteration_s"]) for it in iterations),
        "iteration_s_max": max(float(it["iteration_s"]) for it in iterations),
        "rollout_s": time_total["rollout"] / n,
        "experience_s": time_total["experience"] / n,
        "update_s": time_total["update"] / n,
        "generated_tokens_per_s": total("generated_tokens") / max(time_total["rollout"], 1e-12),
        "trained_tokens_per_s": total("trained_tokens") / max(time_total["update"], 1e-12),
        "response_length_mean": mean([float(it["response_length"]) for it in iterations]),
        "flop_per_iteration": {p: flop_total[p] / n for p in phases},
        "achieved_flops": {**achieved, "all_phases": all_flop / max(phase_time, 1e-12)},
        "mfu_by_phase": {p: achieved[p] / peak_flops for p in phases},
        "mfu": all_flop / max(phase_time, 1e-12) / peak_flops,
    }


def environment(device: torch.device, **versions: str) -> dict:
    """Where a result was measured: Python, torch, the given library versions, machine, device."""
    import platform

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def report(result: dict) -> dict:
    """Write ``result`` to ``--json`` (if given) and print its summary line and table row."""
    write_json(result["args"].get("json"), result)
    peak, params = result["matmul_peak"], result["params"]
    counts = ", ".join(f"{name} {n:,}" for name, n in params.items())
    print(
        f"matmul peak ({peak['dtype']}, {peak['size']}^2): {peak['flops'] / 1e9:.1f} GFLOP/s; "
        f"params: {counts}; optimizer steps per iteration: "
        f"{result['summary']['optimizer_steps_per_iteration']}"
    )
    print(table_header())
    print(table_row(result))
    return result
