"""How close one PPO update step of SmolLM2 on CPU is to its matmul time (fp32).

Two measurements, nothing else running:

1. ``torch.mm`` at the shapes of the update's micro-batch (4 rollouts x 62 positions: 14 prompt +
   48 response; the LM head on the 192 response positions only), GFLOP/s per shape, and the
   FLOP-weighted rate over one forward + backward, against the usual 2048^3 peak.
2. One update step as ``PPOModule`` runs it for a micro-batch: policy + value-head forward on
   response positions, logprobs at temperature 0.7, a loss, backward, gradient clipping, fused
   AdamW. Median wall time, then a ``torch.profiler`` pass that splits the step's CPU time into
   ``aten::mm`` and everything else.

    python experiments/benchmarks/update_step_floor.py [--model builtin:smollm2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from rlhf_lightning.models import resolve_model_source
from rlhf_lightning.models.loading import disable_dropout, load_causal_lm
from rlhf_lightning.models.value_head import PolicyWithValueHead
from rlhf_lightning.ops import logprobs_from_logits

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common
from bench_common import matmul_peak_flops  # noqa: E402

B, P, R = 4, 14, 48  # rollouts per micro-batch, prompt and response positions


def median_time(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rates(d: int, kv: int, inner: int, vocab: int, layers: int, reps: int) -> None:
    """GFLOP/s of the update's products, and their rate weighted by how often one forward +
    backward of the micro-batch runs each: (rows, inner dim, cols, count)."""
    T, Rn, L = B * (P + R), B * R, layers
    shapes = {
        "gate/up fwd, down dX": (T, d, inner, 3 * L),
        "down fwd, gate/up dX": (T, inner, d, 3 * L),
        "gate/up dW": (inner, T, d, 2 * L),
        "down dW": (d, T, inner, L),
        "q/o fwd and dX": (T, d, d, 4 * L),
        "q/o dW": (d, T, d, 2 * L),
        "k/v fwd": (T, d, kv, 2 * L),
        "k/v dX": (T, kv, d, 2 * L),
        "k/v dW": (kv, T, d, 2 * L),
        "LM head fwd": (Rn, d, vocab, 1),
        "LM head dW": (vocab, Rn, d, 1),
        "LM head dX": (Rn, vocab, d, 1),
    }
    total_s = total_flop = 0.0
    for name, (m, k, n, count) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds = median_time(lambda a=a, b=b: torch.mm(a, b), reps)
        flop = 2 * m * k * n
        total_s += seconds * count
        total_flop += flop * count
        print(f"{name:26s} {m}x{k}x{n}: {flop / seconds / 1e9:6.1f} GFLOP/s")
    square = matmul_peak_flops(torch.device("cpu"), torch.float32, size=2048, reps=reps)
    peak = 2 * 2048**3 / square["median_s"]
    print(
        f"one micro-batch forward + backward: {total_flop / 1e9:.0f} GFLOP in {total_s:.3f} s of "
        f"matmuls ({total_flop / total_s / 1e9:.1f} GFLOP/s); 2048^3: {peak / 1e9:.1f} GFLOP/s"
    )


def update_step(model: str, reps: int) -> None:
    path, gguf = resolve_model_source(model)
    lm = disable_dropout(load_causal_lm(path, gguf_file=gguf))
    policy = PolicyWithValueHead(lm).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, eps=1e-5, fused=True)
    vocab = lm.config.vocab_size
    ids = torch.randint(0, vocab, (B, P + R))
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[0, :3] = 0  # one left-padded prompt

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits, values = policy(ids, mask, response_start=P)
        logprobs = logprobs_from_logits(logits, ids[:, P:], 0.7)
        loss = -logprobs.exp().mean() + values.pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()

    seconds = median_time(step, reps)
    with torch.profiler.profile() as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 3 / 1e6
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / 3 / 1e6
    print(f"update step (fwd + bwd + clip + AdamW), median of {reps}: {seconds:.3f} s")
    print(f"profiled: {total:.3f} s per step, aten::mm {mm:.3f} s ({mm / total:.0%})")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    for e in top:
        print(f"  {e.key:50s} {e.self_cpu_time_total / 3 / 1e3:8.1f} ms per step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    matmul_rates(d=576, kv=192, inner=1536, vocab=49152, layers=30, reps=15)
    update_step(args.model, args.reps)


if __name__ == "__main__":
    main()
