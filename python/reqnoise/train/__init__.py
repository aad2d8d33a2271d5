"""Adapter training (mlx-lm's tuner): settings, targets, chat data and batches, the tuner call, data cleaning."""
