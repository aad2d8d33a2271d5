"""Requantization-noise analytics: does an adapter survive the fuse, and the plots of it."""
