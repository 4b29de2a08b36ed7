"""Training: objective, update rule (skip / clip / EMA), steps, checkpoints, local trainer."""
