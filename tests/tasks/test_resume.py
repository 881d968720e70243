"""Resume in process: mid-epoch reward-model resume, checks of bad or foreign checkpoints before
any model loads, stale temporary files, export permissions, the model cache check, and the
pipeline's resume by stage."""

from __future__ import annotations

import os
import shutil
import signal
import stat
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.errors import CheckpointError
from rlhf_lightning.models._util import umask
from rlhf_lightning.models.loading import CacheError
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.reward_model import RewardModelModule
from rlhf_lightning.tasks import pipeline
from rlhf_lightning.tasks.checkpoints import (
    RECORD_KEY,
    RESUME_SETTINGS,
    ResumeCheckpoint,
    run_settings,
)
from rlhf_lightning.tasks.ppo import train_ppo
from rlhf_lightning.tasks.reward_model import train_reward_model
from tests.conftest import TINY_BUDGET, TINY_MODELS, compose_config

TINY = [
    *TINY_MODELS,
    *TINY_BUDGET,
    "~logger",
    "rm.max_epochs=1",
    "rm.lr=3e-3",
    "algorithm.epochs=1",
    "generation.max_new_tokens=6",
]
PPO = ["task=ppo", "reward=token_fraction", "task.eval_every=0"]
PIPELINE = ["task=pipeline", "task.eval_every=1", "task.eval_batches=1"]
RM = ["task=reward_model"]


def _cfg(run_dir: Path, *overrides: str):
    return compose_config([f"paths.output_dir={run_dir}", *TINY, *overrides])


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
    assert str(a["optimizer_states"]) == str(b["optimizer_states"])
    assert str(a["lr_schedulers"]) == str(b["lr_schedulers"])


class Crash(Exception):
    """Stands for a kill: raised inside a training step, no checkpoint is saved for it."""


_RM_TRAINING_STEP = RewardModelModule.training_step


def _record_rm_batches(monkeypatch, crash_at_step: int | None = None) -> list:
    """Record (epoch, step, batch fingerprint) of every reward-model training step; raise Crash
    when the step ``crash_at_step`` starts."""
    seen = []

    def training_step(self, batch, batch_idx):
        if self.global_step == crash_at_step:
            raise Crash
        ids = batch["input_ids"]
        seen.append((self.current_epoch, self.global_step, tuple(ids.shape), int(ids.sum())))
        return _RM_TRAINING_STEP(self, batch, batch_idx)

    monkeypatch.setattr(RewardModelModule, "training_step", training_step)
    return seen


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory) -> Path:
    """A finished tiny reward-model run (1 epoch)."""
    out = tmp_path_factory.mktemp("rm_run")
    train_reward_model(_cfg(out, *RM))
    return out


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory) -> Path:
    """A finished tiny PPO run (2 iterations)."""
    out = tmp_path_factory.mktemp("ppo_run")
    train_ppo(_cfg(out, *PPO))
    return out


# ------------------------------------------------------------------ reward model, mid-epoch
def test_reward_model_resumes_mid_epoch_with_the_remaining_batches_in_order(tmp_path, monkeypatch):
    """96 pairs, batch 16: 6 steps per epoch, last.ckpt every 2 steps. A crash when step 9
    starts (epoch 1) resumes from step 8: the resumed run trains on the batches 8..11 of the
    uninterrupted run, in its order, and ends with the same weights and optimizer state."""
    every = ["rm.max_epochs=2", "rm.checkpoint_every_n_steps=2"]
    straight = _record_rm_batches(monkeypatch)
    train_reward_model(_cfg(tmp_path / "straight", *RM, *every))
    assert [step for _, step, *_ in straight] == list(range(12))

    crashed = _record_rm_batches(monkeypatch, crash_at_step=9)
    with pytest.raises(Crash):
        train_reward_model(_cfg(tmp_path / "crashed", *RM, *every))
    assert _state(tmp_path / "crashed" / "checkpoints" / "last.ckpt")["global_step"] == 8
    resumed = _record_rm_batches(monkeypatch)
    train_reward_model(_cfg(tmp_path / "crashed", *RM, *every, "ckpt_path=last"))
    assert crashed[:8] + resumed == straight

    a, b = (_state(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("straight", "crashed"))
    _assert_same_training_state(a, b)
    for name in ("model.safetensors", "reward_head.safetensors"):
        assert (tmp_path / "straight" / "reward_model" / name).read_bytes() == (
            tmp_path / "crashed" / "reward_model" / name
        ).read_bytes()


def test_a_crash_during_a_validation_resumes_before_it(tmp_path, monkeypatch):
    """Step 6 ends epoch 0 and a validation follows it: last.ckpt is not saved between the two
    (Lightning would resume after that validation and skip it) but at step 4 and after the
    validation. A crash inside the validation resumes from step 4 and runs it."""
    crash, validated = [True], []
    original = RewardModelModule.validation_step

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            if crash[0]:
                raise Crash
            validated.append((self.current_epoch, self.global_step))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(RewardModelModule, "validation_step", validation_step)
    overrides = [*RM, "rm.max_epochs=2", "rm.checkpoint_every_n_steps=2"]
    with pytest.raises(Crash):
        train_reward_model(_cfg(tmp_path, *overrides))
    assert _state(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4
    crash[0] = False
    train_reward_model(_cfg(tmp_path, *overrides, "ckpt_path=last"))
    assert validated == [(0, 6), (1, 12)]


def test_a_crash_after_a_validation_keeps_its_best_checkpoint(tmp_path, monkeypatch):
    """last.ckpt saved at the end of a validation holds the best-checkpoint choice made on that
    validation's metrics: a crash right after it (before the epoch ends) still resumes to a
    best checkpoint for the epoch (the resumed run has no metrics of that validation)."""

    def crash(self):
        raise Crash

    overrides = [*RM, "rm.max_epochs=1", "rm.checkpoint_every_n_steps=2"]
    with monkeypatch.context() as patch:
        patch.setattr(RewardModelModule, "on_train_epoch_end", crash, raising=False)
        with pytest.raises(Crash):
            train_reward_model(_cfg(tmp_path, *overrides))
    result = train_reward_model(_cfg(tmp_path, *overrides, "ckpt_path=last"))
    assert result["best_checkpoint"] == str(tmp_path / "checkpoints" / "rm-epoch=0-step=6.ckpt")
    assert "best_score" in result


def test_rm_checkpoint_every_n_steps_is_validated(tmp_path):
    from rlhf_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=r"rm\.checkpoint_every_n_steps: must be >= 1 or null"):
        train_reward_model(_cfg(tmp_path, *RM, "rm.checkpoint_every_n_steps=0"))


# ----------------------------------------------------------- bad and foreign checkpoints
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr("rlhf_lightning.tasks.ppo.load_policy_lm", loaded)
    monkeypatch.setattr("rlhf_lightning.tasks.reward_model.ScalarRewardModel.from_backbone", loaded)


def _damaged_copies(source: Path, directory: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    directory.mkdir()
    data = source.read_bytes()
    files = {
        "empty": (b"", "the file is empty"),
        "truncated": (data[: len(data) // 2], "truncated or corrupt"),
        "random": (os.urandom(4096), "not a PyTorch checkpoint"),
        "text": (b"not a checkpoint\n", "not a PyTorch checkpoint"),
    }
    cases = {}
    for name, (content, message) in files.items():
        (directory / f"{name}.ckpt").write_bytes(content)
        cases[name] = (directory / f"{name}.ckpt", message)
    torch.save(torch.zeros(3), directory / "tensor.ckpt")
    cases["tensor"] = (directory / "tensor.ckpt", "not a Lightning training checkpoint")
    foreign = _state(source)
    del foreign[RECORD_KEY]
    torch.save(foreign, directory / "foreign.ckpt")
    cases["foreign"] = (directory / "foreign.ckpt", "not written by rlhf-train")
    torch.save({"state_dict": {}, "loops": {}, "x": Fraction(1, 2)}, directory / "pickle.ckpt")
    cases["pickle"] = (directory / "pickle.ckpt", "pickled Python objects")
    return cases


@pytest.mark.parametrize("task", ["ppo", "reward_model"])
def test_a_bad_checkpoint_is_one_error_naming_the_file_before_any_model_loads(
    task, ppo_run, rm_run, tmp_path, no_model_loads
):
    source = (ppo_run if task == "ppo" else rm_run) / "checkpoints" / "last.ckpt"
    train, overrides = (train_ppo, PPO) if task == "ppo" else (train_reward_model, RM)
    for name, (path, message) in _damaged_copies(source, tmp_path / "bad").items():
        with pytest.raises(CheckpointError) as error:
            train(_cfg(tmp_path / name, *overrides, f"ckpt_path={path}"))
        assert str(path) in str(error.value) and message in str(error.value), name


def test_a_checkpoint_of_the_other_task_is_refused(ppo_run, rm_run, tmp_path, no_model_loads):
    rm_ckpt, ppo_ckpt = (run / "checkpoints" / "last.ckpt" for run in (rm_run, ppo_run))
    with pytest.raises(CheckpointError, match="is a reward-model checkpoint.*only from a PPO"):
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={rm_ckpt}"))
    with pytest.raises(CheckpointError, match="is a PPO checkpoint.*only from a reward-model"):
        train_reward_model(_cfg(tmp_path, *RM, f"ckpt_path={ppo_ckpt}"))


def test_changed_settings_are_refused_by_key_unless_forced(ppo_run, tmp_path, no_model_loads):
    ckpt = ppo_run / "checkpoints" / "last.ckpt"
    changed = ["budget.rollout_batch_size=16", "algorithm=grpo", "seed=7"]
    with pytest.raises(CheckpointError) as error:
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={ckpt}", *changed))
    message = str(error.value)
    for part in (
        "budget.rollout_batch_size: 8 in the checkpoint, 16 now",
        "algorithm.name: ppo in the checkpoint, grpo now",
        "algorithm.samples_per_prompt: 1 in the checkpoint, 4 now",
        "seed: 42 in the checkpoint, 7 now",
        "ckpt_force=true",
    ):
        assert part in message
    assert "policy.name_or_path" not in message  # unchanged keys are not listed
    # Training longer is no change of meaning; forcing gets past the check to the model load.
    with pytest.raises(AssertionError, match="a model was loaded"):
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={ckpt}", "budget.num_iterations=5"))
    with pytest.raises(AssertionError, match="a model was loaded"):
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={ckpt}", *changed, "ckpt_force=true"))


def test_other_prompts_are_refused_by_their_own_keys(ppo_run, tmp_path, no_model_loads):
    """The prompt section is checked value by value: another file, or the same file read
    otherwise (prompt length), is another dataset; its eval batch size is not."""
    ckpt = ppo_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as error:
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={ckpt}", "data/prompts=sentiment", "seed=42"))
    assert "data.prompts.path: shipped:sentiment/data/tiny_prompts.jsonl in the checkpoint, " \
        "shipped:sentiment/data/prompts_train.jsonl now" in str(error.value)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"data\.prompts\.max_prompt_length: 32 .*, 24 now"):
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={ckpt}", "data.prompts.max_prompt_length=24"))
    with pytest.raises(AssertionError, match="a model was loaded"):
        train_ppo(_cfg(tmp_path, *PPO, f"ckpt_path={ckpt}", "data.prompts.eval_batch_size=3"))


@pytest.mark.parametrize("kind", ["ppo", "reward_model"])
def test_every_resume_setting_is_a_key_of_the_config(kind, monkeypatch):
    """A setting renamed in conf/ but not in RESUME_SETTINGS would drop out of the check: each
    resolves in every shipped prompt or preference config, in its task's and the pipeline's
    config, and a missing one is an error, not a silent None. A reasoning-gym task is checked
    by its generator's settings (it has no file)."""
    section = "prompts" if kind == "ppo" else "preferences"
    for data in sorted((Path(__file__).parents[2] / "conf" / "data" / section).glob("*.yaml")):
        for task in (kind, "pipeline"):
            settings = run_settings(
                compose_config([f"task={task}", f"data/{section}={data.stem}"]), kind
            )
            assert RESUME_SETTINGS[kind][0] in settings and f"data.{section}._target_" in settings
            assert not {f"data.{section}.eval_batch_size", f"data.{section}.num_workers"} & set(
                settings
            )
    chain_sum = run_settings(compose_config(["data/prompts=reasoning_gym_chain_sum"]), "ppo")
    assert chain_sum["data.prompts.generator"] == "chain_sum"
    assert chain_sum["data.prompts.difficulty"]["max_terms"] == 3
    cfg = compose_config([f"task={kind}"])
    monkeypatch.setitem(RESUME_SETTINGS, kind, (*RESUME_SETTINGS[kind], "algorithm.no_such_key"))
    with pytest.raises(KeyError, match="algorithm.no_such_key"):
        run_settings(cfg, kind)


def test_reward_model_settings_are_checked_too(rm_run, tmp_path, no_model_loads):
    ckpt = rm_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"data\.preferences\.batch_size: 16 .*, 8 now"):
        train_reward_model(
            _cfg(tmp_path, *RM, f"ckpt_path={ckpt}", "data.preferences.batch_size=8")
        )


def test_ppo_module_refuses_a_checkpoint_without_its_state():
    with pytest.raises(CheckpointError, match="not written by PPOModule"):
        PPOModule.on_load_checkpoint(None, {"state_dict": {}})


# -------------------------------------------------------------------------------- signals
def test_the_first_sigint_asks_for_a_stop_the_second_stops_at_once():
    """While training: the first SIGINT only asks for a stop at the next safe point, the second
    raises KeyboardInterrupt; after training the previous handlers are back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    callback = ResumeCheckpoint("unused", "ppo", {}, "rlhf-train ...")
    callback._handle_signals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # asks for the same stop; no exception
    finally:
        callback.on_train_end(None, None)
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------- stale temporaries, file permissions
def test_a_start_removes_stale_temporaries_and_files_honour_the_umask(tmp_path):
    """A crash while saving leaves ``.last.ckpt.<random>.tmp``: the next start removes it.
    Checkpoints and exported files get 0o666 & ~umask (not the 0600 of a temporary file)."""
    run = tmp_path / "run"
    train_reward_model(_cfg(run, *RM))
    stale = run / "checkpoints" / ".last.ckpt.k2j4_x9q.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = run / "checkpoints" / "notes.tmp"  # not ours: kept
    other.write_text("x")
    previous = os.umask(0o027)
    try:
        train_reward_model(_cfg(run, *RM, "rm.max_epochs=2", "ckpt_path=last"))
    finally:
        os.umask(previous)
    assert not stale.exists() and other.exists()
    files = [run / "checkpoints" / "last.ckpt", *(run / "reward_model").iterdir()]
    assert {p.name for p in files} >= {"model.safetensors", "reward_head.safetensors"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


# ------------------------------------------------------------------------------ model cache
def test_an_unwritable_model_cache_fails_before_the_first_stage(tmp_path, monkeypatch):
    """The cache path lies under a regular file: no one, root included, can create it."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(pipeline, "train_reward_model", _must_not_run)
    with pytest.raises(CacheError, match="RLHF_LIGHTNING_CACHE.*cannot write there"):
        pipeline.run(_cfg(tmp_path / "run", *PIPELINE))


def test_a_full_model_cache_fails_before_the_first_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(tmp_path / "cache"))
    usage = SimpleNamespace(total=10, used=9, free=1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(pipeline, "train_reward_model", _must_not_run)
    with pytest.raises(CacheError, match="RLHF_LIGHTNING_CACHE.*0 MiB free"):
        pipeline.run(_cfg(tmp_path / "run", *PIPELINE))


def test_a_cached_model_needs_no_writable_cache(tmp_path, monkeypatch, tiny_model_dir):
    from rlhf_lightning.models.loading import check_cache_writable

    check_cache_writable(["builtin:tiny", "some/hub-id", str(tmp_path)])  # tiny is cached
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    check_cache_writable(["some/hub-id", "builtin:minilm"])  # nothing to write: no check
    with pytest.raises(CacheError):
        check_cache_writable(["builtin:tiny"])


def _must_not_run(*args, **kwargs):
    raise AssertionError("a stage started")


# ------------------------------------------------------------------- pipeline, by stage
def test_pipeline_resumes_by_stage(tmp_path, monkeypatch):
    """A pipeline stopped after its reward-model stage, before PPO's first checkpoint, resumes
    with ckpt_path=last: the reward model is not retrained, PPO starts from the beginning, and
    the end state equals an uninterrupted run's. A resume of the finished run trains nothing."""
    pipe = PIPELINE
    pipeline.run(_cfg(tmp_path / "straight", *pipe))

    def crash(self, batch, batch_idx):
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(PPOModule, "training_step", crash)
        with pytest.raises(Crash):
            pipeline.run(_cfg(tmp_path / "crashed", *pipe))
    crashed = tmp_path / "crashed"
    assert (crashed / "stages" / "reward_model.json").is_file()
    assert not list((crashed / "checkpoints" / "ppo").glob("*.ckpt"))
    rm_files = {p: p.stat().st_mtime_ns for p in (crashed / "reward_model").iterdir()}

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_reward_model", _must_not_run)
        pipeline.run(_cfg(crashed, *pipe, "ckpt_path=last"))
    assert {p: p.stat().st_mtime_ns for p in (crashed / "reward_model").iterdir()} == rm_files
    straight = tmp_path / "straight"
    a, b = (_state(d / "checkpoints" / "ppo" / "last.ckpt") for d in (straight, crashed))
    _assert_same_training_state(a, b)
    for name in ("policy/model.safetensors", "reward_model/model.safetensors"):
        assert (straight / name).read_bytes() == (crashed / name).read_bytes()
    assert (crashed / "summary.json").is_file()
    mode = 0o666 & ~umask()
    for export in ("policy", "reward_model"):
        for path in (crashed / export).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == mode, path

    monkeypatch.setattr(pipeline, "train_reward_model", _must_not_run)
    monkeypatch.setattr(pipeline, "train_ppo", _must_not_run)
    pipeline.run(_cfg(crashed, *pipe, "ckpt_path=last"))  # both stages finished: skipped


def test_pipeline_resume_checks_finished_stages_and_refuses_a_used_run_dir(tmp_path, monkeypatch):
    from rlhf_lightning.config import ConfigError

    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    pipeline.write_json_atomically(
        run / "stages" / "reward_model.json",
        {"settings": {"reward_backbone.name_or_path": "builtin:minilm"}, "result": {}},
    )
    monkeypatch.setattr(pipeline, "train_reward_model", _must_not_run)
    with pytest.raises(CheckpointError, match="reward_backbone.name_or_path: builtin:minilm in"):
        pipeline.run(_cfg(run, *PIPELINE, "ckpt_path=last"))
    with pytest.raises(ConfigError, match="holds a started pipeline run.*ckpt_path=last"):
        pipeline.run(_cfg(run, *PIPELINE))
    with pytest.raises(ConfigError, match="ckpt_path: task=pipeline resumes with ckpt_path=last"):
        pipeline.run(_cfg(run, *PIPELINE, f"ckpt_path={run / 'x.ckpt'}"))
    # ckpt_path=last with nothing to resume: a start from the beginning.
    assert pipeline.check_resume(_cfg(tmp_path / "empty", *PIPELINE, "ckpt_path=last"))
