"""mlx-lm adapter directories: ``adapters.safetensors`` + ``adapter_config.json``, read into per-module
low-rank factors in the kernel's orientation.

mlx-lm stores, per adapted module path ``P``: ``P.lora_a``, ``P.lora_b`` (float32) and, for DoRA, ``P.m``.
LoRALinear: ``lora_a`` (in, r), ``lora_b`` (r, out). LoRASwitchLinear: ``lora_a`` (E, r, in), ``lora_b``
(E, out, r). The delta is ``scale * lora_b.T @ lora_a.T`` resp. ``scale * lora_b @ lora_a`` with ``scale`` a
plain multiplier from ``lora_parameters.scale``.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.model_io import read_safetensors_header
from reqnoise.jsonl import read_json
from reqnoise.kernel.formats import logical_in_dim
from reqnoise.kernel.quant_format import all_finite

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora")


@dataclass
class ModuleAdapter:
    """One adapted module. ``a``: [r, in] or [E, r, in]; ``b``: [out, r] or [E, out, r] (float32);
    ``magnitude``: DoRA's [out] or None; delta = scale * b @ a."""

    module: str
    a: mx.array
    b: mx.array
    scale: float
    magnitude: mx.array = None

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    @property
    def experts(self):
        return self.a.shape[0] if self.a.ndim == 3 else None

    def delta(self, e0=None, e1=None):
        """The dense ``scale * b @ a`` in the factors' dtype: [out, in], or [e1 - e0, out, in] for experts
        ``e0:e1`` of a stack. Only the float paths and the noise metrics form it; the kernel never does."""
        if e0 is None:
            return self.scale * self.b @ self.a
        return self.scale * self.b[e0:e1] @ self.a[e0:e1]


@dataclass
class Adapter:
    path: Path
    config: dict
    fine_tune_type: str
    scale: float
    modules: dict  # module path -> ModuleAdapter


def _finite(x: mx.array, name: str, path: Path) -> None:
    if not all_finite(x):
        raise ReqnoiseError(f"{path}: adapter tensor {name} contains NaN or Inf")


def load_adapter(path) -> Adapter:
    """Read and validate an adapter directory (config keys, tensor names, shapes, finiteness)."""
    path = Path(path)
    if not path.is_dir():
        raise ReqnoiseError(f"adapter directory {path} does not exist")
    cfg_path = path / CONFIG_FILE
    config = read_json(cfg_path, "adapter config")
    ftype = config.get("fine_tune_type", "lora")
    if ftype not in FINE_TUNE_TYPES:
        raise ReqnoiseError(
            f"{cfg_path}: fine_tune_type {ftype!r} cannot be fused by reqnoise "
            f"(expected one of {FINE_TUNE_TYPES}; 'full' has no low-rank delta)"
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise ReqnoiseError(f"{cfg_path}: missing 'lora_parameters' with a 'scale'")
    try:
        scale = float(params["scale"])
    except (TypeError, ValueError):
        raise ReqnoiseError(f"{cfg_path}: lora_parameters.scale must be a number, got {params['scale']!r}") from None
    weights = path / ADAPTER_FILE
    if not weights.is_file():
        raise ReqnoiseError(f"adapter weights {weights} do not exist")
    read_safetensors_header(weights)  # refuses truncated or corrupt files with a clear message
    try:
        tensors = mx.load(str(weights))
    except Exception as err:
        raise ReqnoiseError(f"cannot read {weights}: {err}") from None

    groups: dict = {}
    for name, arr in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b", "m") or not module:
            raise ReqnoiseError(f"{weights}: unexpected tensor {name!r} (expected MODULE.lora_a, .lora_b or .m)")
        groups.setdefault(module, {})[kind] = arr
    if not groups:
        raise ReqnoiseError(f"{weights} holds no adapter tensors")
    modules = {}
    for module, parts in sorted(groups.items()):
        if "lora_a" not in parts or "lora_b" not in parts:
            raise ReqnoiseError(f"{weights}: module {module} needs both lora_a and lora_b, has {sorted(parts)}")
        a, b = parts["lora_a"], parts["lora_b"]
        for kind, arr in parts.items():
            _finite(arr, f"{module}.{kind}", weights)
        if a.ndim == 2 and b.ndim == 2:
            if a.shape[1] != b.shape[0]:
                raise ReqnoiseError(
                    f"{weights}: {module}.lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} "
                    "disagree on the rank (expected (in, r) and (r, out))"
                )
            a_k, b_k = a.T, b.T
        elif a.ndim == 3 and b.ndim == 3:
            if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
                raise ReqnoiseError(
                    f"{weights}: {module}.lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} "
                    "do not fit (expected (E, r, in) and (E, out, r))"
                )
            a_k, b_k = a, b
        else:
            raise ReqnoiseError(
                f"{weights}: {module}.lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} are "
                "neither a LoRALinear nor a LoRASwitchLinear pair"
            )
        m = parts.get("m")
        if m is not None and (m.ndim != 1 or m.shape[0] != b_k.shape[-2] or a.ndim != 2):
            raise ReqnoiseError(f"{weights}: {module}.m has shape {tuple(m.shape)}, expected ({b_k.shape[-2]},)")
        modules[module] = ModuleAdapter(
            module, a_k.astype(mx.float32), b_k.astype(mx.float32), scale, None if m is None else m.astype(mx.float32)
        )
    return Adapter(path, config, ftype, scale, modules)


def check_against_model(adapter: Adapter, model) -> None:
    """Refuse adapter modules that match nothing in the model, or whose shapes do not fit it (mlx-lm
    would silently ignore the first kind)."""
    missing = [m for m in adapter.modules if f"{m}.weight" not in model.tensors]
    if missing:
        raise ReqnoiseError(
            f"adapter {adapter.path}: {len(missing)} module(s) match no tensor in {model.path}, "
            f"e.g. {missing[0]!r} (no {missing[0]}.weight)"
        )
    rotated = [m for m in adapter.modules if model.hadamard_rotated(m)]
    if rotated:
        # W' = W R^T there: adding the delta as is would apply it to rotated inputs (mlx-lm cannot train it either)
        raise ReqnoiseError(
            f"adapter {adapter.path}: {rotated[0]} is stored Hadamard-rotated in {model.path} ({rotated[0]}.signs); "
            "a low-rank delta cannot be fused into it"
        )
    for name, mod in adapter.modules.items():
        info = model.tensors[f"{name}.weight"]
        qp = model.quant_params(name) if model.is_quantized(name) else None
        in_dim = logical_in_dim(info.shape[-1], qp[0]) if qp else info.shape[-1]
        expected_lead = info.shape[:-2]
        out_dim = info.shape[-2]
        ok = tuple(mod.a.shape) == expected_lead + (mod.rank, in_dim) and tuple(mod.b.shape) == expected_lead + (
            out_dim,
            mod.rank,
        )
        if not ok:
            lead = f"{expected_lead[0]}, " if expected_lead else ""
            raise ReqnoiseError(
                f"adapter {adapter.path}: {name} factors a {tuple(mod.a.shape)} / b {tuple(mod.b.shape)} (kernel "
                f"orientation) do not fit the model weight {info.shape} (expected a ({lead}r, {in_dim}) and "
                f"b ({lead}{out_dim}, r))"
            )
