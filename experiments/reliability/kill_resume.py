"""Kill tiny runs with SIGKILL at random moments, resume them, compare with uninterrupted runs.

For each stage (``ppo``, ``reward_model``, ``pipeline``; tiny models, trained for ``LONGER`` here
and for ``STAGES`` alone in ``tests/test_reliability.py``): one uninterrupted reference run, then
chains of runs in fresh run dirs. A chain starts the run and SIGKILLs it after a random delay,
restarts it (``ckpt_path=last``; a fresh start when a standalone task had saved no checkpoint
yet), and so on for up to ``--kills-per-chain`` kills; then it lets the run finish and compares
its end state with the reference's: every tensor of the final ``last.ckpt`` (weights, optimizer
state, LR schedulers), its epoch and step counts, and the exported files, byte for byte.

The delay is drawn (seeded) uniformly in [0, W], counted from the moment the run's job starts
(Hydra writes ``.hydra/config.yaml``, after the Python imports), where W is the reference's wall
time from that moment to its end: kills land in model loading, data checks, training,
checkpoint writes and exports in proportion to their time. A run that ends before its delay
ends the chain. After every kill the script records what the kill left (the step of each
``last.ckpt``, the finished pipeline stages, temporary files of an interrupted checkpoint
write); after the last resume no temporary file may remain.

    nice -n 10 python experiments/reliability/kill_resume.py --kills 20 --seed 0 \\
        --out experiments/reliability/results.json

Exit status 0 when every chain ends equal to its reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "policy=tiny",
    "reward_backbone=tiny",
    "data/prompts=tiny",
    "data/preferences=tiny",
    "trainer.enable_progress_bar=false",
    "~logger",
    "generation.max_new_tokens=8",
    "budget.rollout_batch_size=8",
    "budget.minibatch_size=4",
    "budget.micro_batch_size=2",
    "algorithm.epochs=2",
    "rm.lr=1e-3",
    "rm.checkpoint_every_n_steps=2",
]
STAGES = {
    "ppo": [
        "task=ppo",
        "reward=token_fraction",
        "budget.num_iterations=12",
        "task.eval_every=3",
        "task.eval_batches=1",
        "task.checkpoint_every=1",
    ],
    "reward_model": ["task=reward_model", "rm.max_epochs=6"],
    "pipeline": [
        "task=pipeline",
        "rm.max_epochs=3",
        "budget.num_iterations=6",
        "task.eval_every=2",
        "task.eval_batches=1",
        "task.checkpoint_every=1",
    ],
}
# The experiment trains longer than the test suite's runs, so that most of a run's time is
# training (with checkpoint writes) rather than start-up.
LONGER = {
    "ppo": ["budget.num_iterations=30"],
    "reward_model": ["rm.max_epochs=16"],
    "pipeline": ["rm.max_epochs=4", "budget.num_iterations=12"],
}
# What must be equal at the end: (final checkpoint, exported files), relative to the run dir.
END_STATE = {
    "ppo": (["checkpoints/last.ckpt"], ["policy/model.safetensors"]),
    "reward_model": (
        ["checkpoints/last.ckpt"],
        ["reward_model/model.safetensors", "reward_model/reward_head.safetensors"],
    ),
    "pipeline": (
        ["checkpoints/reward_model/last.ckpt", "checkpoints/ppo/last.ckpt"],
        [
            "reward_model/model.safetensors",
            "reward_model/reward_head.safetensors",
            "policy/model.safetensors",
        ],
    ),
}


def start(stage: str, run_dir: Path, resume: bool, log, extra=()) -> subprocess.Popen:
    """The stage's tiny run in ``run_dir`` (``ckpt_path=last`` when ``resume``), with the
    ``extra`` overrides."""
    command = [
        sys.executable, "-m", "rlhf_lightning.cli.train", *TINY, *STAGES[stage], *extra,
        f"hydra.run.dir={run_dir}", *(["ckpt_path=last"] if resume else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)


def checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "checkpoints").rglob("*.ckpt") if p.is_file()]


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp"))


def progress(run_dir: Path) -> dict:
    """What a kill left: the finished pipeline stages and the global step of each last.ckpt."""
    steps = {}
    for path in sorted((run_dir / "checkpoints").rglob("last.ckpt")):
        try:
            steps[str(path.relative_to(run_dir))] = torch.load(
                path, map_location="cpu", weights_only=True, mmap=True
            )["global_step"]
        except Exception as error:  # a dangling link, or a file being replaced
            steps[str(path.relative_to(run_dir))] = f"unreadable: {type(error).__name__}"
    stages = sorted(p.stem for p in (run_dir / "stages").glob("*.json"))
    return {"last_ckpt_step": steps, "finished_stages": stages}


def differences(stage: str, reference: Path, run_dir: Path) -> list[str]:
    """Where the end state of ``run_dir`` differs from ``reference``'s (empty: equal)."""
    found = []
    ckpts, files = END_STATE[stage]
    for name in ckpts:
        a, b = (_load(directory / name) for directory in (reference, run_dir))
        for key in ("epoch", "global_step"):
            if a[key] != b[key]:
                found.append(f"{name}: {key} {a[key]} != {b[key]}")
        for key in ("state_dict", "optimizer_states", "lr_schedulers"):
            found += [f"{name}: {key}{path}" for path in _unequal(a[key], b[key])]
    for name in files:
        if (reference / name).read_bytes() != (run_dir / name).read_bytes():
            found.append(f"{name}: bytes differ")
    return found


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _unequal(a, b, path: str = "") -> list[str]:
    """Paths inside two nested containers of tensors where they differ (exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys differ"]
        return [p for key in a for p in _unequal(a[key], b[key], f"{path}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _unequal(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if torch.equal(a, b) else [path]
    return [] if a == b else [path]


def wait_for_job(proc: subprocess.Popen, run_dir: Path, since: float) -> float | None:
    """Wait until the run's Hydra job has started (``.hydra/config.yaml`` written after
    ``since``, a ``time.time()``); returns that moment on the monotonic clock, or None if the
    process ended first."""
    config = run_dir / ".hydra" / "config.yaml"
    while proc.poll() is None:
        if config.is_file() and config.stat().st_mtime >= since:
            return time.monotonic()
        time.sleep(0.02)
    return None


def run_chain(stage, reference, run_dir, max_kills, work_seconds, rng, log, extra=()) -> dict:
    """Kill and resume one run up to ``max_kills`` times, then finish it and compare."""
    kills, resume = [], False
    while True:
        delay = rng.uniform(0.0, work_seconds) if len(kills) < max_kills else None
        since = time.time()
        proc = start(stage, run_dir, resume, log, extra)
        began = wait_for_job(proc, run_dir, since)
        try:
            proc.wait(timeout=None if delay is None else delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(
                {"after_s": round(time.monotonic() - began, 2), **progress(run_dir),
                 "temporaries_left": temporaries(run_dir)}
            )  # fmt: skip
            resume = stage == "pipeline" or bool(checkpoints(run_dir))
            continue
        if proc.returncode != 0:
            return {"kills": kills, "ok": False, "error": f"exit status {proc.returncode}"}
        found = differences(stage, reference, run_dir)
        left = temporaries(run_dir)
        ok = not found and not left
        return {"kills": kills, "ok": ok, "differences": found, "temporaries_at_end": left}


def run_stage(stage, workdir, kills, kills_per_chain, rng, log, extra=()) -> dict:
    """A reference run, then chains of kills and resumes until ``kills`` kills were made."""
    reference = workdir / f"{stage}-reference"
    since = time.time()
    proc = start(stage, reference, False, log, extra)
    began = wait_for_job(proc, reference, since)
    if proc.wait() != 0 or began is None:
        raise SystemExit(f"{stage}: the reference run failed (see the log)")
    seconds = time.monotonic() - began
    chains, done = [], 0
    while done < kills:
        chain_dir = workdir / f"{stage}-chain{len(chains)}"
        planned = min(kills_per_chain, kills - done)
        chain = {
            "planned_kills": planned,
            **run_chain(stage, reference, chain_dir, planned, seconds, rng, log, extra),
        }
        done += len(chain["kills"])
        chains.append(chain)
        status = "equal" if chain["ok"] else f"DIFFERENT {chain.get('differences') or chain}"
        print(f"{stage}: chain {len(chains)}: {len(chain['kills'])} kills, end state {status}")
    return {"reference_job_seconds": round(seconds, 1), "chains": chains}


def summary(results: dict) -> dict:
    rows = {}
    for stage, result in results.items():
        kills = [kill for chain in result["chains"] for kill in chain["kills"]]
        rows[stage] = {
            "kills": len(kills),
            "kills_before_any_checkpoint": sum(
                not kill["last_ckpt_step"] and not kill["finished_stages"] for kill in kills
            ),
            "kills_leaving_a_temporary_file": sum(bool(kill["temporaries_left"]) for kill in kills),
            "chains_with_kills": sum(bool(chain["kills"]) for chain in result["chains"]),
            "chains_with_kills_equal_to_reference": sum(
                chain["ok"] for chain in result["chains"] if chain["kills"]
            ),
            "runs_ending_before_their_kill_moment": sum(
                len(chain["kills"]) < chain["planned_kills"] for chain in result["chains"]
            ),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per stage")
    parser.add_argument("--kills-per-chain", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--workdir", type=Path, default=Path("outputs/kill_resume"))
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    workdir = args.workdir / f"seed{args.seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    results = {}
    with open(workdir / "runs.log", "w") as log:
        for stage in args.stages.split(","):
            results[stage] = run_stage(
                stage, workdir, args.kills, args.kills_per_chain, rng, log, LONGER[stage]
            )
    report = {"seed": args.seed, "summary": summary(results), "stages": results}
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(c["ok"] for r in results.values() for c in r["chains"]) else 1


if __name__ == "__main__":
    sys.exit(main())
