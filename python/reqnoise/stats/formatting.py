"""How numbers are written in reqnoise's printed output (a leaf module: no numpy, no mlx)."""


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal (0.1234 -> "12.3%"); None (no value) -> "-"."""
    return "-" if x is None else f"{100 * x:.1f}%"
