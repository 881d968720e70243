"""rlhf_lightning: RLHF (reward modelling + PPO) on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
