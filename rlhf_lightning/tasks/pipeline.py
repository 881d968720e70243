"""``rlhf-train`` (task=pipeline, the default): reward model, then PPO against it, then a summary.

1. train the reward model on the preference pairs (``cfg.data.preferences``) and export it to
   ``<run dir>/reward_model``;
2. PPO of the policy against that learned reward (``reward=learned``, path set to the export),
   judged on held-out prompts by ``gold_reward`` (VADER by default), which PPO never sees;
3. export the final policy to ``<run dir>/policy`` and write ``summary.json`` and ``summary.md``
   with before/after metrics and sample completions.

Resume by stage: ``rlhf-train hydra.run.dir=<run dir> ckpt_path=last`` skips the stages that
finished (``<run dir>/stages/<stage>.json``, written atomically once the stage's export is
complete), continues the stage that was running from its last checkpoint
(``checkpoints/<stage>/``), and starts from the beginning a stage that had saved none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from rlhf_lightning.config import ConfigError, rm_config_from
from rlhf_lightning.models._util import honour_umask
from rlhf_lightning.models.loading import check_cache_writable
from rlhf_lightning.preflight import check_learned_reward
from rlhf_lightning.tasks.checkpoints import refuse_changed_settings, run_settings
from rlhf_lightning.tasks.common import checkpoint_dir, run_dir, write_atomically
from rlhf_lightning.tasks.ppo import load_prompts, train_ppo, validate_ppo_setup
from rlhf_lightning.tasks.reward_model import train_reward_model

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("val/reward", "val/gold_score", "val/kl", "val/response_length")


def run(cfg: DictConfig) -> float | None:
    # Validate both stages' settings before spending minutes on the first one.
    check_learned_reward(cfg)
    rm_config_from(cfg.rm)
    ppo_cfg = validate_ppo_setup(cfg)
    check_cache_writable([cfg.reward_backbone.name_or_path, cfg.policy.name_or_path])
    load_prompts(cfg, ppo_cfg)  # the PPO stage's data and the settings that need its tokenizer
    resuming = check_resume(cfg)

    rm = run_stage(cfg, "reward_model", train_reward_model, resuming)
    ppo = run_stage(cfg, "ppo", train_ppo, resuming)
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


def stage_record(cfg: DictConfig, stage: str) -> Path:
    """``<run dir>/stages/<stage>.json``: the settings and result of a finished stage."""
    return run_dir(cfg) / "stages" / f"{stage}.json"


def check_resume(cfg: DictConfig) -> bool:
    """Whether this run resumes (``ckpt_path=last``). Refuses an explicit checkpoint path (a
    pipeline resumes each stage from its own checkpoints) and a fresh start in a run dir that
    holds a started run (its checkpoints would be mixed with the new run's)."""
    value = cfg.get("ckpt_path")
    if value not in (None, "last"):
        raise ConfigError(
            "invalid config: ckpt_path: task=pipeline resumes with ckpt_path=last (each stage "
            "from its own checkpoints in the run dir); a checkpoint file resumes "
            "task=reward_model or task=ppo"
        )
    started = any(stage_record(cfg, stage).is_file() for stage in ("reward_model", "ppo")) or any(
        checkpoint_dir(cfg).glob("*/*.ckpt")
    )
    if value is None and started and rank_zero_only.rank == 0:
        raise ConfigError(
            f"invalid config: hydra.run.dir: {run_dir(cfg)} holds a started pipeline run; resume "
            "it with ckpt_path=last, or start a new run in another hydra.run.dir"
        )
    if value == "last" and not started:
        log.warning("nothing to resume in %s: the pipeline starts from the beginning", run_dir(cfg))
    return value == "last"


def run_stage(cfg: DictConfig, stage: str, train: Callable[..., dict], resuming: bool) -> dict:
    """Run one stage (``train(cfg, stage_dir=stage)``) and return its result, or, when resuming
    a run that finished it, its recorded result. The record is written last, atomically, after
    the stage's export is complete (and given the umask's permissions)."""
    record = stage_record(cfg, stage)
    settings = run_settings(cfg, stage)
    if resuming and record.is_file():
        done = json.loads(record.read_text())
        force = bool(cfg.get("ckpt_force", False))
        refuse_changed_settings(f"stage {stage} ({record})", done["settings"], settings, force)
        log.info("stage %s finished before (%s): skipped", stage, record)
        return done["result"]
    result = train(cfg, stage_dir=stage)
    if result["path"] is not None:  # rank 0, which exported
        honour_umask(result["path"])
        write_json_atomically(record, {"settings": settings, "result": result})
    return result


def write_json_atomically(path: Path, data: dict) -> None:
    """``path`` holds all of ``data`` as JSON, or (after a crash) its previous content."""
    write_atomically(path, "w", lambda f: json.dump(data, f, indent=2))


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
