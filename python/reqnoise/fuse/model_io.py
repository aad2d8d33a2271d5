"""Reading and writing mlx-lm model directories shard by shard, without loading the whole model.

A model directory holds ``config.json`` (with a ``quantization`` block: default ``bits``/``group_size`` and
per-module overrides keyed by module path, e.g. an 8-bit router), ``model*.safetensors`` shards with or
without ``model.safetensors.index.json``, and tokenizer and other files.

mlx is imported inside the functions that make arrays: the rest (``layer_index``, headers, the model
index) serves callers that never load a model.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import read_json
from reqnoise.kernel.formats import FP_MODES, SUPPORTED_MODES

INDEX_NAME = "model.safetensors.index.json"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from the safetensors header alone."""

    name: str
    shard: Path
    shape: tuple
    dtype: str  # safetensors dtype string: "U32", "BF16", "F16", "F32", ...
    offsets: tuple = (0, 0)  # absolute byte range of the data in the shard file


@dataclass
class ModelDir:
    """An mlx-lm model directory, indexed but not loaded."""

    path: Path
    config: dict
    shards: list = field(default_factory=list)  # shard Paths, in file order
    tensors: dict = field(default_factory=dict)  # name -> TensorInfo

    def quant_params(self, module: str):
        """``(bits, group_size)`` of a module, or None if it is not quantized (per-module overrides win)."""
        q = self.config.get("quantization")
        if not q:
            return None
        override = q.get(module)
        if override is False:
            return None
        if isinstance(override, dict):
            return int(override["bits"]), int(override["group_size"])
        if f"{module}.scales" not in self.tensors:
            return None
        return int(q["bits"]), int(q["group_size"])

    def quant_mode(self, module: str):
        """The MLX quantization mode of a quantized module ("affine", "mxfp4", "nvfp4", "mxfp8"), or None.

        As mlx-lm's loader reads it: a per-module override is passed whole to ``to_quantized``, so one without
        a ``mode`` key is affine whatever the global mode (mlx-lm's qwen3_moe predicate writes its 8-bit
        routers that way); a module without an override takes the global ``mode`` (default affine). Refuses a
        mode the stored scales contradict (fp modes store uint8 scales and no biases) and nvfp4 global scales.
        """
        q = self.config.get("quantization")
        scales = self.tensors.get(f"{module}.scales")
        if not q or scales is None or q.get(module) is False:
            return None
        override = q.get(module)
        mode = override.get("mode", "affine") if isinstance(override, dict) else q.get("mode", "affine")
        if mode not in SUPPORTED_MODES:
            raise ReqnoiseError(f"{module}: quantization mode {mode!r} is not one of {SUPPORTED_MODES}")
        fp = mode in FP_MODES
        biased = f"{module}.biases" in self.tensors
        if fp != (scales.dtype == "U8") or fp == biased:
            raise ReqnoiseError(
                f"{module}: config.json says mode {mode!r} but it has {scales.dtype} scales and "
                f"{'' if biased else 'no '}biases (mode mismatch between config and tensors)"
            )
        if f"{module}.global_scale" in self.tensors:
            raise ReqnoiseError(f"{module}: nvfp4 with a global scale per expert is not supported")
        return mode

    def is_quantized(self, module: str) -> bool:
        if f"{module}.scales" not in self.tensors:
            return False
        return f"{module}.biases" in self.tensors or self.quant_mode(module) in FP_MODES

    def modules(self):
        """Module paths that own a ``.weight`` tensor."""
        return sorted(n[: -len(".weight")] for n in self.tensors if n.endswith(".weight"))

    def is_hadamard_pack(self) -> bool:
        """A Hadamard pack (mlx-lm's prism_hadamard_qwen35): an external packer's format whose ModelArgs accepts
        exactly one quantization block and lists its packed modules in the config's ``modules`` manifest."""
        return isinstance(self.config.get("modules"), list) and "tensor_namespace" in self.config

    def hadamard_rotated(self, module: str) -> bool:
        """The module's weight acts on Hadamard-rotated inputs (a pack stores the rotation's ``signs`` beside it)."""
        return f"{module}.signs" in self.tensors


def layer_index(module: str):
    """The transformer block index in a module path (``model.layers.14.mlp...`` -> 14), or None."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def read_safetensors_header(path: Path) -> dict:
    """Tensor name -> (shape, dtype) from a safetensors header, checking that the file holds every byte
    the header promises (a truncated or corrupt shard is refused here, before any work)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensors need {8 + n + end} bytes, the file has {size} (truncated?)")
        with safe_open(str(path), framework="numpy") as f:  # the library's own validation of the header
            names = list(f.keys())
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ReqnoiseError(f"{path} is not a valid safetensors file: {err}") from None
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ReqnoiseError(f"{path} is not a valid safetensors file: {err}") from None
    base = 8 + n
    return {
        k: (
            tuple(header[k]["shape"]),
            header[k]["dtype"],
            (base + header[k]["data_offsets"][0], base + header[k]["data_offsets"][1]),
        )
        for k in names
    }


def open_model_dir(path) -> ModelDir:
    """Index a model directory: config, shards and every tensor's shape and dtype."""
    path = Path(path)
    if not path.is_dir():
        raise ReqnoiseError(f"model directory {path} does not exist")
    config = read_json(path / "config.json", "model config")
    q = config.get("quantization")
    if q is not None and (not isinstance(q, dict) or "bits" not in q or "group_size" not in q):
        raise ReqnoiseError(f"{path / 'config.json'}: 'quantization' must hold 'bits' and 'group_size'")
    if q is not None and q.get("mode", "affine") not in SUPPORTED_MODES:
        raise ReqnoiseError(f"{path / 'config.json'}: quantization mode {q['mode']!r} is not one of {SUPPORTED_MODES}")
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ReqnoiseError(f"{index} has no 'weight_map'")
        shards = sorted({path / f for f in weight_map.values()})
    else:
        shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise ReqnoiseError(f"no model*.safetensors shards in {path}")
    md = ModelDir(path=path, config=config, shards=shards)
    for shard in shards:
        if not shard.is_file():
            raise ReqnoiseError(f"shard {shard} named in {index.name} does not exist")
        for name, (shape, dtype, offsets) in read_safetensors_header(shard).items():
            md.tensors[name] = TensorInfo(name, shard, shape, dtype, offsets)
    check_quantized_tensors(md)
    return md


def check_quantized_tensors(md: ModelDir) -> None:
    """Refuse a model whose quantized tensors contradict its config: a mode reqnoise does not know in a per-module
    override, scale/bias tensors the module's mode does not have (an mxfp4 checkpoint whose config says affine
    would otherwise be fused as float), or a (bits, group_size) that does not give the stored shapes."""
    q = md.config.get("quantization")
    cfg = md.path / "config.json"
    for module in md.modules():
        if f"{module}.scales" not in md.tensors:
            continue
        if not q:
            raise ReqnoiseError(f"{cfg}: {module} has quantization scales but the config has no 'quantization' block")
        override = q.get(module)
        params = override if isinstance(override, dict) else q
        mode = md.quant_mode(module)  # mlx-lm's rule for which mode a module has; refuses scales that contradict it
        weight, scales = md.tensors[f"{module}.weight"], md.tensors[f"{module}.scales"]
        bits, group = int(params["bits"]), int(params["group_size"])
        words = weight.shape[-1]
        if weight.dtype != "U32" or (words * 32) % bits or scales.shape[-1] * group != words * 32 // bits:
            raise ReqnoiseError(
                f"{cfg}: {module} weight {weight.dtype} {weight.shape} and scales {scales.shape} are not {bits}-bit "
                f"group-{group} {mode} tensors as the config says (mismatch between config and tensors)"
            )


_NP_DTYPES = {
    "U32": "<u4",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I32": "<i4",
    "U8": "u1",
    "I8": "i1",
    "I64": "<i8",
    "U16": "<u2",
    "I16": "<i2",
    "BOOL": "?",
}


def read_tensor(info: TensorInfo):
    """One tensor straight from its byte range (for a module whose tensors straddle two shards)."""
    import mlx.core as mx

    if info.dtype not in _NP_DTYPES:
        raise ReqnoiseError(f"{info.shard}: tensor {info.name} has unsupported dtype {info.dtype}")
    start, end = info.offsets
    with open(info.shard, "rb") as fh:
        fh.seek(start)
        raw = fh.read(end - start)
    if len(raw) != end - start:
        raise ReqnoiseError(f"{info.shard}: tensor {info.name} is truncated")
    arr = mx.array(np.frombuffer(raw, dtype=_NP_DTYPES[info.dtype]).reshape(info.shape))
    return arr.view(mx.bfloat16) if info.dtype == "BF16" else arr


def load_shard(shard: Path) -> dict:
    """All tensors of one shard as mx.arrays."""
    import mlx.core as mx

    try:
        return mx.load(str(shard))
    except Exception as err:
        raise ReqnoiseError(f"cannot read {shard}: {err}") from None


def save_shard(tensors: dict, path: Path) -> None:
    """Write tensors as an MLX safetensors shard (the metadata mlx-lm writes)."""
    import mlx.core as mx

    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})
