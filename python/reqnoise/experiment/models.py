"""Model operations of the experiment runner that no other command offers (``[models.X] quantize = {...}``)."""

import contextlib
import io
from pathlib import Path


def quantize_model_dir(src: Path, dst: Path, *, bits: int, group_size: int) -> dict:
    """mlx-lm's own quantization (``mlx_lm.convert``, its quant predicate included) of the float model directory
    ``src`` into the new directory ``dst``. Returns {bits, group_size} for the step's summary."""
    from mlx_lm import convert  # mlx-lm loads only when a spec quantizes

    # convert() prints its progress; the runner's log is the one voice of a run.
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), mlx_path=str(dst), quantize=True, q_bits=bits, q_group_size=group_size)
    return {"bits": bits, "group_size": group_size}
