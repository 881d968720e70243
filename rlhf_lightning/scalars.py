"""A run's scalars read back from its TensorBoard event files (``rlhf-compare``, the plot
scripts of ``experiments/``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from rlhf_lightning.hparams import HPARAMS_RUN, METRIC_PREFIX
from rlhf_lightning.tracking import recorded_log_dirs


def scalar_events(run_dir: str | Path) -> Iterator[tuple[str, int, float, float]]:
    """``(tag, step, wall_time, value)`` of every scalar in the event files of a run: those under
    ``run_dir`` and under the directories it recorded (:func:`recorded_log_dirs`); the final
    metrics of a TensorBoard ``HPARAMS_RUN`` with ``METRIC_PREFIX``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for directory in [Path(run_dir), *recorded_log_dirs(run_dir)]:
        for events in sorted(directory.rglob("events.out.tfevents.*")):
            accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
            accumulator.Reload()
            prefix = METRIC_PREFIX if events.parent.name == HPARAMS_RUN else ""
            for tag in accumulator.Tags()["scalars"]:
                for e in accumulator.Scalars(tag):
                    yield prefix + tag, e.step, e.wall_time, e.value


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run (:func:`scalar_events`): tag -> (step, value) sorted by step, one
    value a step: the one written last (a resumed run that logs a step again wins).

    Used by the plotting scripts in ``experiments/``.
    """
    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall_time, value)
    for tag, step, wall_time, value in scalar_events(run_dir):
        steps = latest.setdefault(tag, {})
        if step not in steps or wall_time >= steps[step][0]:
            steps[step] = (wall_time, value)
    return {
        tag: [(step, value) for step, (_, value) in sorted(steps.items())]
        for tag, steps in latest.items()
    }


EVAL_METRICS = ("val/reward", "val/gold_score", "val/kl", "val/response_length")


def eval_rows(scalars: Mapping[str, list[tuple[int, float]]]) -> list[dict[str, float]]:
    """One row per PPO eval: ``iteration`` (0 = before PPO) and the ``val/`` metrics then."""
    by_step: dict[int, dict[str, float]] = {}
    for tag in EVAL_METRICS:
        for step, value in scalars.get(tag, []):
            by_step.setdefault(step, {})[tag] = value
    return [{"iteration": step, **values} for step, values in sorted(by_step.items())]
