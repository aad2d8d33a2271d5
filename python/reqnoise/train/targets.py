"""Which modules an adapter trains: selection by module TYPE, filtered by layer index and block-relative name.

Targets are found by type (Linear, QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, or anything with
``to_lora``), filtered by layer index and by block-relative name suffix, and handed to mlx-lm as an exact list
of full module paths, so ``modules=["down_proj"], layers=[8, 14, 20]`` reaches ``mlp.switch_mlp.down_proj`` (or
``experts`` / ``switch_glu`` in other architectures) of exactly those blocks. A selection that matches nothing
is refused (mlx-lm would train zero parameters without a word), and so is a fine-tune type mlx-lm cannot train
on the selected modules.
"""

from pathlib import Path

from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.model_io import layer_index


def _target_types():
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def _as_module(model):
    """A loaded mlx-lm model, or a model directory loaded lazily (weights are not read)."""
    import mlx.nn as nn

    if isinstance(model, nn.Module):
        return model
    from mlx_lm.utils import load_model

    path = Path(model)
    if not (path / "config.json").is_file():
        raise ReqnoiseError(f"model directory {path} has no config.json")
    return load_model(path, lazy=True)[0]


def adaptable_modules(model) -> dict:
    """Full module path -> module, for every module mlx-lm can wrap with LoRA (by type, not by name)."""
    types_ = _target_types()
    return {p: m for p, m in model.named_modules() if isinstance(m, types_) or hasattr(m, "to_lora")}


def _relative(path: str) -> str:
    """``model.layers.8.mlp.switch_mlp.down_proj`` -> ``mlp.switch_mlp.down_proj``."""
    marker = f"layers.{layer_index(path)}."
    return path[path.index(marker) + len(marker) :]


def _kind(module) -> str:
    bits = getattr(module, "bits", None)
    experts = getattr(module, "num_experts", None)
    extra = [f"{bits}-bit"] if bits is not None and hasattr(module, "scales") else []
    if experts:
        extra.append(f"{experts} experts")
    return type(module).__name__ + (f" {', '.join(extra)}" if extra else "")


def _ranges(idx) -> str:
    idx, out, start = sorted(idx), [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def describe_adaptable(model) -> str:
    """One line per block-relative module name (with its type and the layers that have it), for messages."""
    mods = adaptable_modules(_as_module(model))
    per_name: dict = {}
    outside = []
    for path, m in mods.items():
        li = layer_index(path)
        if li is None:
            outside.append(f"{path} ({_kind(m)})")
        else:
            per_name.setdefault(_relative(path), [set(), _kind(m)])[0].add(li)
    lines = [f"  {name} ({kind}) in layers {_ranges(layers)}" for name, (layers, kind) in sorted(per_name.items())]
    if outside:
        lines.append("  outside the blocks (reachable with keys): " + ", ".join(sorted(outside)))
    return "\n".join(lines) if lines else "  (none)"


def _sort_key(path: str):
    li = layer_index(path)
    return (li is None, -1 if li is None else li, path)


def find_targets(model, layers=None, modules=None, keys=None) -> list[str]:
    """Full module paths to adapt, selected by module type.

    Args:
        model: a loaded mlx-lm model (``nn.Module``) or a model directory (loaded lazily).
        layers: block indices (e.g. ``[8, 14, 20]``); None = every block.
        modules: block-relative name suffixes matched on ``.`` boundaries (``"down_proj"`` matches
            ``mlp.switch_mlp.down_proj``; ``"switch_mlp.down_proj"`` or ``"self_attn.q_proj"`` are narrower);
            None = every adaptable module in the selected blocks (mlx-lm's default set, routers included).
        keys: exact full module paths (``model.layers.8.mlp.switch_mlp.down_proj``); exclusive with
            ``layers``/``modules``; the only way to reach modules outside the blocks (e.g. ``lm_head``).

    Returns the paths sorted by layer index. Raises ReqnoiseError, listing what exists, when the selection is
    empty, a layer is out of range, a ``modules`` entry matches nothing, or a key is not an adaptable module.
    """
    model = _as_module(model)
    mods = adaptable_modules(model)
    if keys is not None:
        if layers is not None or modules is not None:
            raise ReqnoiseError("keys are full module paths: give either keys or layers/modules, not both")
        keys = list(dict.fromkeys(keys))
        if not keys:
            raise ReqnoiseError("keys is empty; nothing would be trained")
        named = dict(model.named_modules())
        for key in keys:
            if key not in mods:
                what = (
                    f"is a {type(named[key]).__name__}, not a linear layer"
                    if key in named
                    else "is not a module of this model"
                )
                raise ReqnoiseError(f"key {key!r} {what}; adaptable modules:\n{describe_adaptable(model)}")
        return sorted(keys, key=_sort_key)

    n_blocks = len(model.layers)
    if layers is not None:
        layers = sorted({int(i) for i in layers})
        bad = [i for i in layers if not 0 <= i < n_blocks]
        if bad:
            raise ReqnoiseError(f"layers {bad} do not exist: the model has {n_blocks} blocks (0-{n_blocks - 1})")
        if not layers:
            raise ReqnoiseError("layers is empty; nothing would be trained")
    in_blocks = {
        p: m for p, m in mods.items() if layer_index(p) is not None and (layers is None or layer_index(p) in layers)
    }
    if modules is None:
        selected = set(in_blocks)
    else:
        modules = [str(m).strip().strip(".") for m in modules]
        if not any(modules):
            raise ReqnoiseError("modules is empty; nothing would be trained")
        selected = set()
        for name in modules:
            hits = {p for p in in_blocks if p == name or p.endswith("." + name)}
            if not hits:
                where = "any block" if layers is None else f"layers {_ranges(layers)}"
                raise ReqnoiseError(
                    f"module {name!r} matches no adaptable module in {where}; adaptable modules:\n"
                    f"{describe_adaptable(model)}"
                )
            selected |= hits
    if not selected:
        raise ReqnoiseError(
            f"the selection matches no adaptable module; adaptable modules:\n{describe_adaptable(model)}"
        )
    return sorted(selected, key=_sort_key)


def check_fine_tune_type(model, targets, fine_tune_type: str) -> None:
    """Refuse, before any work, what mlx-lm cannot train (it would fail deep inside or train garbage)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    named = dict(model.named_modules())
    for path in targets:
        m = named[path]
        quantized = hasattr(m, "scales")
        if fine_tune_type == "dora":
            if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
                raise ReqnoiseError(
                    f"DoRA is not available for expert stacks: {path} is a {type(m).__name__} and "
                    "mlx-lm has no DoRA switch layer; use fine_tune_type lora for experts"
                )
            if quantized and 32 % m.bits:
                raise ReqnoiseError(
                    f"DoRA cannot be built on {path}: it is {m.bits}-bit quantized and mlx-lm's DoRALinear "
                    f"recovers the input size as packed*(32//bits), wrong for {m.bits} bits (only 2, 4 and 8 work); "
                    "use fine_tune_type lora, or a model quantized at 4 or 8 bits or unquantized"
                )
        elif fine_tune_type == "full" and quantized:
            raise ReqnoiseError(
                f"full fine-tuning needs float weights: {path} is {m.bits}-bit quantized and MLX "
                "cannot differentiate through quantized weights; use lora/dora or a dequantized model"
            )
