"""LightningModules: RewardModelModule (Bradley-Terry) and PPOModule (manual optimization)."""
