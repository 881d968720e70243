"""The ladder's presets in rung order: the sweep list of ``conf/experiment/ladder.yaml``, the
one place that names them (``grad_variance.py`` and ``plot.py`` read it from there)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

LADDER_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "ladder.yaml"


def ladder_presets(config: Path = LADDER_CONFIG) -> tuple[str, ...]:
    """The ``algorithm`` values the ladder experiment sweeps, in the order it lists them."""
    sweep = OmegaConf.load(config).hydra.sweeper.params.algorithm
    return tuple(name.strip() for name in str(sweep).split(","))
