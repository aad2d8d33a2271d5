"""Statistics on per-item records: tests and intervals, power, decomposition, pre-registration."""
