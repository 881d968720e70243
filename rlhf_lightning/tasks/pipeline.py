"""``rlhf-train`` (task=pipeline, the default): reward model, then PPO against it, then a summary.

1. train the reward model on the preference pairs (``cfg.data.preferences``) and export it to
   ``<run dir>/reward_model``;
2. PPO of the policy against that learned reward (``reward=learned``, path set to the export),
   judged on held-out prompts by ``gold_reward`` (VADER by default), which PPO never sees;
3. export the final policy to ``<run dir>/policy`` and write ``summary.json`` and ``summary.md``
   with before/after metrics and sample completions.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from rlhf_lightning.config import rm_config_from
from rlhf_lightning.tasks.common import run_dir
from rlhf_lightning.tasks.ppo import train_ppo, validate_ppo_setup
from rlhf_lightning.tasks.reward_model import train_reward_model

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("val/reward", "val/gold_score", "val/kl", "val/response_length")


def run(cfg: DictConfig) -> float | None:
    # Validate both stages' settings before spending minutes on the first one.
    rm_config_from(cfg.rm)
    validate_ppo_setup(cfg)

    rm = train_reward_model(cfg, stage_dir="reward_model")
    ppo = train_ppo(cfg, stage_dir="ppo")
    summary = {
        "reward_model": {k: v for k, v in rm.items() if k != "metric"},
        "ppo": {
            "before": {k: ppo["baseline"].get(k) for k in SUMMARY_METRICS},
            "after": {k: ppo["final"].get(k) for k in SUMMARY_METRICS},
            "policy_path": ppo["path"],
        },
        "samples": {"before": ppo["baseline_samples"], "after": ppo["final_samples"]},
    }
    if ppo["path"] is not None:  # rank 0 writes the summary
        out = run_dir(cfg)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(render_summary(summary))
        log.info("summary written to %s", out / "summary.md")
    return ppo["metric"]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_summary(summary: dict) -> str:
    """A short markdown report: reward-model accuracy, before/after metrics, samples."""
    rm = summary["reward_model"]
    ppo = summary["ppo"]
    lines = [
        "# RLHF pipeline summary",
        "",
        f"Reward model: best val accuracy {_fmt(rm.get('best_score'))}, exported to "
        f"`{rm.get('path')}`.",
        "",
        "| held-out metric | before PPO | after PPO |",
        "|---|---|---|",
    ]
    for key in SUMMARY_METRICS:
        lines.append(f"| {key} | {_fmt(ppo['before'].get(key))} | {_fmt(ppo['after'].get(key))} |")
    lines += ["", f"Final policy: `{ppo['policy_path']}`", ""]
    for when in ("before", "after"):
        lines += [
            f"## Samples {when} PPO",
            "",
            "| prompt | response | reward | gold |",
            "|---|---|---|---|",
        ]
        for row in summary["samples"][when][:6]:
            prompt, response, reward = (str(row[0]), str(row[1]), row[2])
            gold = row[3] if len(row) > 3 else None
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in (prompt, response)]
            lines.append(f"| {cells[0]} | {cells[1]} | {_fmt(reward)} | {_fmt(gold)} |")
        lines.append("")
    return "\n".join(lines)
