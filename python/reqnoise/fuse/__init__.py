"""Model-level fusion of mlx-lm adapters: adapters, controls, fuse options, model-directory I/O."""
