"""The README's custom-reward command: a module found through PYTHONPATH, selected by `_target_`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MYREWARDS = '''
from pathlib import Path


def fn(prompts, responses):
    """Fraction of "e" in each response; leaves a mark that PPO called it."""
    Path("fn_was_called").touch()
    return [r.count("e") / max(len(r), 1) for r in responses]
'''


def rlhf_train() -> list[str]:
    """The `rlhf-train` console script of this environment (its module where not installed)."""
    script = Path(sys.executable).with_name("rlhf-train")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlhf_lightning.cli.train"]


def test_readme_custom_reward_command_runs_ppo_with_a_module_from_pythonpath(tmp_path):
    (tmp_path / "myrewards.py").write_text(MYREWARDS)
    # `PYTHONPATH=.` as in the README; the repository first, so this checkout is what runs.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), "."]), "OMP_NUM_THREADS": "1"}
    cmd = [
        *rlhf_train(),
        "task=ppo",
        "policy=tiny",
        "data/prompts=tiny",
        "reward._target_=myrewards.fn",
        "+reward._partial_=true",
        "experiment=tiny_smoke",
        "budget.num_iterations=1",
        "~logger",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fn_was_called").is_file()
    assert (tmp_path / "run" / "policy" / "model.safetensors").is_file()
