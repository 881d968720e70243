"""Rollouts: sampling responses (generation) and experience making for the PPO update."""
