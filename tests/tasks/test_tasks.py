"""The tasks end to end with tiny models: configs compose, runs export what they promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_lightning.cli.train import run
from rlhf_lightning.config import ConfigError
from rlhf_lightning.models import ScalarRewardModel
from tests.conftest import TINY_BUDGET, TINY_MODELS, compose_config


def tokenizer_of(path):
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(path)


TINY = [
    *TINY_MODELS,
    *TINY_BUDGET,
    "rm.max_epochs=2",
    "algorithm.epochs=2",
    "task.eval_every=1",
    "task.eval_batches=1",
    "generation.max_new_tokens=8",
]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config([f"paths.output_dir={tmp_path}", *TINY, *overrides])


@pytest.mark.parametrize("task", ["pipeline", "reward_model", "ppo"])
@pytest.mark.parametrize("policy", ["smollm2", "tiny", "gpt2_imdb", "smollm2_hub"])
def test_every_task_and_policy_composes(tmp_path, task, policy):
    cfg = compose_config([f"task={task}", f"policy={policy}"])
    assert cfg.task.name == task and cfg.policy.name_or_path
    assert callable(__import__("hydra").utils.get_method(cfg.task.fn))


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_and_exports(tmp_path):
    metric = run(_cfg(tmp_path))
    assert metric is not None and -1.0 <= metric <= 1.0  # VADER compound score range
    summary = json.loads((tmp_path / "summary.json").read_text())
    for when in ("before", "after"):
        assert all(v is not None for v in summary["ppo"][when].values()), summary["ppo"][when]
    assert summary["ppo"]["before"]["val/kl"] == 0.0  # the policy is its own reference
    assert summary["samples"]["before"] and summary["samples"]["after"]
    assert "| val/gold_score |" in (tmp_path / "summary.md").read_text()
    # The reward model was normalised on its training responses and reloads as saved.
    rm = ScalarRewardModel.from_pretrained(tmp_path / "reward_model")
    assert rm.gain.item() != 1.0
    # The exported policy is a plain transformers model.
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert isinstance(lm, torch.nn.Module)
    assert (tmp_path / "checkpoints" / "ppo" / "last.ckpt").is_file()
    # The export samples as training did: plain transformers and rlhf-generate read the settings.
    from transformers import GenerationConfig as HFGenerationConfig

    from rlhf_lightning.cli.generate import build_parser, generation_config_from

    hf = HFGenerationConfig.from_pretrained(tmp_path / "policy")
    assert hf.do_sample and hf.temperature == 0.7 and hf.max_new_tokens == 8 and hf.top_k == 0
    newline = tokenizer_of(tmp_path / "policy").encode("\n", add_special_tokens=False)
    assert hf.eos_token_id[0] == newline[0]  # the single-line task's stop token
    args = build_parser().parse_args([str(tmp_path / "policy")])
    gen = generation_config_from(args, str(tmp_path / "policy"))
    assert (gen.temperature, gen.max_new_tokens, gen.stop_token) == (0.7, 8, "\n")
    args = build_parser().parse_args([str(tmp_path / "policy"), "--max-new-tokens", "5"])
    assert generation_config_from(args, str(tmp_path / "policy")).max_new_tokens == 5
    # Each stage is its own TensorBoard run (steps start at 0 in each, val/ metrics not mixed).
    from rlhf_lightning.scalars import read_scalars

    rm_scalars, ppo_scalars = (read_scalars(tmp_path / "tb" / s) for s in ("reward_model", "ppo"))
    assert "val/accuracy" in rm_scalars and "val/reward" not in rm_scalars
    assert "val/reward" in ppo_scalars and "val/accuracy" not in ppo_scalars

    # The first things a user runs after training: sample from and evaluate the export.
    from rlhf_lightning.cli import evaluate, generate

    samples = tmp_path / "samples.jsonl"
    generate.main([str(tmp_path / "policy"), "The film was", "--max-new-tokens", "6",
                   "--num-samples", "2", "--output", str(samples)])  # fmt: skip
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "The film was" for r in rows)
    report = tmp_path / "eval.json"
    evaluate.main([
        str(tmp_path / "policy"), "--reference", "builtin:tiny",
        "--prompts", "shipped:sentiment/data/tiny_prompts.jsonl", "--num-prompts", "8",
        "--reward", "learned", f"path={tmp_path / 'reward_model'}", "--gold", "vader",
        "--max-new-tokens", "6", "--output", str(report),
    ])  # fmt: skip
    metrics = json.loads(report.read_text())["metrics"]
    assert {"reward", "gold_score", "kl", "win_rate", "distinct_1"} <= set(metrics)
    assert 0.0 <= metrics["win_rate"] <= 1.0


def test_bad_config_fails_before_any_model_loads(tmp_path):
    cfg = _cfg(tmp_path, "task=ppo", "reward=token_fraction", "budget.minibatch_size=3")
    with pytest.raises(ConfigError, match="budget.minibatch_size"):
        run(cfg)
    cfg = _cfg(tmp_path, "task=ppo", "reward=learned")
    with pytest.raises(ConfigError, match="reward.path"):
        run(cfg)
    # The pipeline trains its own reward model: a verifier or a rule needs task=ppo.
    cfg = _cfg(tmp_path, "data/prompts=reasoning_gym_chain_sum", "reward=reasoning_gym")
    with pytest.raises(ConfigError, match=r"reward\._target_ is .*ReasoningGymReward.*task=ppo"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("before", [True, False])
def test_the_starting_policy_is_evaluated_first_unless_told_not_to(tmp_path, before):
    from rlhf_lightning.tasks.ppo import train_ppo

    cfg = _cfg(
        tmp_path, "task=ppo", "reward=token_fraction", "~logger", "budget.num_iterations=1",
        f"task.eval_before={str(before).lower()}",
    )  # fmt: skip
    result = train_ppo(cfg)
    assert ("val/reward" in result["baseline"]) is before
    assert bool(result["baseline_samples"]) is before
    assert "val/reward" in result["final"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, "task=ppo", "reward=token_fraction", "ckpt_path=last")
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*last.ckpt"):
        run(cfg)


def test_last_falls_back_to_the_newest_checkpoint_when_the_link_is_gone(tmp_path):
    import time

    from rlhf_lightning.tasks.common import resolve_ckpt_path

    cfg = _cfg(tmp_path, "ckpt_path=last")
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "iterepoch=1.ckpt").write_bytes(b"old")
    time.sleep(0.01)
    (directory / "iterepoch=2.ckpt").write_bytes(b"new")
    assert resolve_ckpt_path(cfg) == str(directory / "iterepoch=2.ckpt")
    (directory / "last.ckpt").write_bytes(b"link")
    assert resolve_ckpt_path(cfg) == str(directory / "last.ckpt")


@pytest.mark.slow
def test_ppo_under_ddp_with_two_cpu_processes(tmp_path):
    """`strategy=ddp` re-launches the command as rank 1, so run the real CLI in a subprocess;
    each rank dumps its weights and the responses it scored (tests/ddp_helpers.py)."""
    from tests.ddp_helpers import load_dump

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli.train",
        "task=ppo",
        "reward=token_fraction",
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path}",
        "task.fn=tests.ddp_helpers.ppo_with_rank_dumps",
        *TINY,
    ]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stdout + proc.stderr or "distributed_backend=gloo" in (
        proc.stdout + proc.stderr
    )
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # After every update both ranks hold the same weights, and they moved.
    start = load_dump(tmp_path, 0, "start")["params"]
    for iteration in (0, 1):
        ranks = [load_dump(tmp_path, r, f"iter{iteration}") for r in (0, 1)]
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4 * (iteration + 1)
        weights = [dump["params"] for dump in ranks]
        assert weights[0].keys() == weights[1].keys() == start.keys()
        for name in start:
            assert torch.equal(weights[0][name], weights[1][name]), (iteration, name)
        assert any(not torch.equal(weights[0][n], start[n]) for n in start if n.startswith("lm."))
        # Metrics are reduced over ranks: both log the same numbers (timings are each rank's).
        metrics = [
            {k: v for k, v in dump["metrics"].items() if not k.startswith(("time/", "perf/"))}
            for dump in ranks
        ]
        assert metrics[0].keys() == metrics[1].keys() and "policy/approx_kl" in metrics[0]
        for name, value in metrics[0].items():
            assert value == metrics[1][name] or math.isnan(value) and math.isnan(metrics[1][name])
        assert metrics[0]["policy/epochs"] == 2.0
        assert 0.0 <= metrics[0]["optim/clipped_frac"] <= 1.0
    # The ranks sampled different responses (their own seeds), 8 per iteration each.
    responses = [load_dump(tmp_path, r, "iter1")["responses"] for r in (0, 1)]
    assert [len(batch) for batch in responses[0]] == [len(b) for b in responses[1]] == [8, 8]
    for iteration in (0, 1):
        assert responses[0][iteration] != responses[1][iteration]
    # The last evaluation's per-prompt scores, both ranks' shards, in the prompts' order.
    from hydra.utils import instantiate

    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    data = instantiate(_cfg(tmp_path).data.prompts, tokenizer=tokenizer_of("builtin:tiny"))
    data.setup()
    assert [row["prompt"] for row in rows] == [item["prompt"] for item in data.eval_items]
    # The exported policy is rank 0's final weights.
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "policy" / "model.safetensors")
    final = load_dump(tmp_path, 0, "iter1")["params"]
    for name, value in exported.items():
        torch.testing.assert_close(value, final[f"lm.{name}"], rtol=0, atol=0)


def test_critic_with_another_tokenizer_fails_before_models_load(tmp_path):
    from rlhf_lightning.models import ScalarRewardModel, load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny", padding_side="right")
    tokenizer.add_tokens(["<other>"])  # a different vocabulary from the policy's
    critic_dir = tmp_path / "critic"
    ScalarRewardModel.from_backbone("builtin:tiny").save_pretrained(critic_dir, tokenizer)
    cfg = _cfg(
        tmp_path, "task=ppo", "reward=token_fraction", "algorithm/value_model=critic",
        f"algorithm.value_model.path={critic_dir}",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="value_model.path: .* different tokenizer"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()
