"""Adapter training through mlx-lm's tuner: target selection, chat data and batches, data cleaning."""
