"""Model-level fusion: fuse an mlx-lm adapter (or a control) into a quantized model directory.

Streams one shard at a time and one target module at a time; peak memory is bounded by the largest shard
plus one module's output, not by the model. The output directory appears only when complete.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from reqnoise import __version__, atomic
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import ModuleAdapter, check_against_model, load_adapter
from reqnoise.fuse.controls import CONTROLS, apply_control, delta_norms
from reqnoise.fuse.model_io import INDEX_NAME, layer_index, load_shard, open_model_dir, read_tensor, save_shard
from reqnoise.kernel.op import fuse_quantized
from reqnoise.kernel.quant_format import check_width

REQUANT_MODES = ("fresh", "keep-grid", "dequantize")
REPORT_NAME = "fuse_report.json"
_PARTS = ("weight", "scales", "biases")


@dataclass
class FuseReport:
    """What a fuse did; written as ``fuse_report.json`` beside the weights."""

    model: str
    adapter: str
    save_path: str
    requant: str
    out_bits: int | None
    control: str
    seed: int
    layers: list | None
    fine_tune_type: str
    modules: list = field(default_factory=list)  # one dict per fused module
    ignored_modules: list = field(default_factory=list)  # adapter modules left out by --layers
    rewritten_shards: list = field(default_factory=list)
    copied_shards: list = field(default_factory=list)
    seconds: float = 0.0
    reqnoise_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)


def _check_paths(model: Path, adapter: Path, save: Path) -> None:
    m, a, s = model.resolve(), adapter.resolve(), save.resolve()
    for label, p in (("model directory", m), ("adapter directory", a)):
        if s == p or p in s.parents:
            raise ReqnoiseError(f"save path {save} is the {label} {p} or inside it; choose another path")
        if s in p.parents:
            raise ReqnoiseError(f"save path {save} contains the {label} {p}; replacing it would destroy the input")


def _low_rank_delta(f: ModuleAdapter, dtype):
    """Dense ``scale * b @ a`` cast to ``dtype`` (the float paths only; the kernel never forms it)."""
    return (f.scale * f.b @ f.a).astype(dtype)


def _dora(w, magnitude):
    # mlx-lm's DoRALinear.fuse: the row factor is float32, so the fused weight is float32.
    return (magnitude / mx.linalg.norm(w, axis=-1))[..., None] * w


def _fuse_float(w, f, experts_per_step: int = 16):
    """W + delta in W's dtype (mlx-lm's arithmetic), stacks a few experts at a time."""
    if f is None:
        return w
    if w.ndim == 3:
        parts = []
        for e0 in range(0, w.shape[0], experts_per_step):
            sl = slice(e0, e0 + experts_per_step)
            part = w[sl] + (f.scale * f.b[sl] @ f.a[sl]).astype(w.dtype)
            mx.eval(part)
            parts.append(part)
        out = mx.concatenate(parts)
    else:
        out = w + _low_rank_delta(f, w.dtype)
    if f.magnitude is not None:
        out = _dora(out, f.magnitude)
    return out


def fuse_module(parts: dict, qp, factors, requant: str, out_bits) -> dict:
    """Fuse one module. ``parts``: its tensors by suffix (weight[, scales, biases]); ``qp``: (bits,
    group_size) or None; ``factors``: a ModuleAdapter or None (zero delta). Returns the new tensors by suffix
    (a dequantized module has no scales/biases any more)."""
    if qp is None:
        return {"weight": _fuse_float(parts["weight"], factors)}
    bits, group = qp
    if requant == "dequantize":
        w = mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=group, bits=bits)
        return {"weight": _fuse_float(w, factors)}
    if requant == "fresh" and factors is not None and factors.magnitude is not None:
        # DoRA: mlx-lm's DoRALinear.fuse op for op on the CPU stream. Its row norm is MLX's float32 reduction
        # (the kernel's is float64), and its float32 row factor makes the new scales and biases float32
        # whatever the model's dtype; only the same ops give the same bytes.
        with mx.stream(mx.cpu):
            w = mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=group, bits=bits)
            wq, s, b = mx.quantize(_fuse_float(w, factors), group_size=group, bits=out_bits or bits)
        return {"weight": wq, "scales": s, "biases": b}
    kw = {}
    if factors is not None:
        kw = dict(lora_a=factors.a, lora_b=factors.b, scale=factors.scale, dora_magnitude=factors.magnitude)
        if factors.magnitude is not None and parts["weight"].ndim == 3:
            kw["dora_magnitude"] = mx.broadcast_to(factors.magnitude, parts["weight"].shape[:2])
    wq, s, b = fuse_quantized(
        parts["weight"],
        parts["scales"],
        parts["biases"],
        group_size=group,
        bits=bits,
        requant=requant,
        out_bits=out_bits if requant == "fresh" else None,
        **kw,
    )
    return {"weight": wq, "scales": s, "biases": b}


def _copy_other_files(md, dst: Path, skip=()) -> None:
    """Copy every file and folder of the model directory except its shards and the names in ``skip``."""
    for item in sorted(md.path.iterdir()):
        if item.name in skip or item in md.shards:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)


def _select_targets(adapter, layers):
    keep, ignored = {}, []
    for name, mod in adapter.modules.items():
        if layers is not None and layer_index(name) not in layers:
            ignored.append(name)
        else:
            keep[name] = mod
    return keep, ignored


def _updated_config(config: dict, targets, model, requant: str, out_bits):
    cfg = json.loads(json.dumps(config))
    if requant == "dequantize":
        cfg.pop("quantization", None)
        cfg.pop("quantization_config", None)
        return cfg
    if out_bits:
        for key in ("quantization", "quantization_config"):
            if isinstance(cfg.get(key), dict):
                for name in targets:
                    qp = model.quant_params(name)
                    if qp is not None and model.is_quantized(name):
                        cfg[key][name] = {"group_size": qp[1], "bits": out_bits}
    return cfg


def fuse_model(
    model,
    adapter_path,
    save_path,
    *,
    requant="fresh",
    out_bits=None,
    control="none",
    seed=0,
    layers=None,
    overwrite=False,
    progress=True,
) -> FuseReport:
    """Fuse an mlx-lm adapter into a model directory and write a new model directory.

    Args:
        model: mlx-lm model directory (quantized or not).
        adapter_path: mlx-lm adapter directory (LoRA on dense and switch layers, DoRA on dense layers).
        save_path: output directory; written to a temporary sibling and renamed into place when complete.
        requant: "fresh" (what mlx-lm's fuse does), "keep-grid" (keep every group's scale/bias: a zero delta
            gives the identical model) or "dequantize" (float output, quantization removed).
        out_bits: fresh only: re-quantize the fused modules at this width (per-module config override).
        control: "none" (the adapter), "zero" (zero delta through the same pipeline) or "random"
            (norm-matched random delta per module and expert, from ``seed``).
        layers: fuse only modules in these layer indices; the rest of the adapter is ignored (reported).
        overwrite: replace an existing ``save_path``.

    Returns:
        A FuseReport (also written to ``save_path/fuse_report.json``).
    """
    t_start = time.perf_counter()
    model, adapter_path, save_path = Path(model), Path(adapter_path), Path(save_path)
    if requant not in REQUANT_MODES:
        raise ReqnoiseError(f"requant must be one of {REQUANT_MODES}, got {requant!r}")
    if control not in CONTROLS:
        raise ReqnoiseError(f"control must be one of {CONTROLS}, got {control!r}")
    if out_bits is not None:
        if requant != "fresh":
            raise ReqnoiseError(f"--out-bits re-quantizes from scratch and needs --requant fresh, not {requant}")
        try:
            check_width(out_bits, 64, "out_bits")
        except ValueError as err:
            raise ReqnoiseError(str(err)) from None
    _check_paths(model, adapter_path, save_path)
    if save_path.exists() and not overwrite:
        raise ReqnoiseError(f"{save_path} already exists (pass --overwrite to replace it)")
    md = open_model_dir(model)
    adapter = load_adapter(adapter_path)
    check_against_model(adapter, md)
    layer_set = None if layers is None else {int(x) for x in layers}
    targets, ignored = _select_targets(adapter, layer_set)
    if not targets:
        raise ReqnoiseError(
            f"--layers {sorted(layer_set)} selects none of the adapter's "
            f"{len(adapter.modules)} modules (layers present: "
            f"{sorted({layer_index(m) for m in adapter.modules} - {None})})"
        )

    report = FuseReport(
        str(model),
        str(adapter_path),
        str(save_path),
        requant,
        out_bits,
        control,
        seed,
        None if layer_set is None else sorted(layer_set),
        adapter.fine_tune_type,
        ignored_modules=sorted(ignored),
    )
    # Which modules must be rewritten, and which shards they touch.
    rewrite = dict(targets)
    if requant == "dequantize":
        for name in md.modules():
            if md.is_quantized(name):
                rewrite.setdefault(name, None)
    shard_modules: dict = {}
    for name in rewrite:
        for part in _PARTS:
            info = md.tensors.get(f"{name}.{part}")
            if info is not None:
                shard_modules.setdefault(info.shard, set()).add(name)

    from tqdm import tqdm

    bar = tqdm(total=len(targets), desc="fuse", unit="module", disable=not progress, leave=False)
    pending: dict = {}  # outputs of modules that straddle shards, waiting for their other shard
    new_names: dict = {}
    with atomic.atomic_dir(save_path, overwrite=overwrite) as tmp:
        _copy_other_files(md, tmp, skip=("config.json", INDEX_NAME, REPORT_NAME))
        for shard in md.shards:
            names = sorted(shard_modules.get(shard, ()))
            if not names:
                shutil.copyfile(shard, tmp / shard.name)
                report.copied_shards.append(shard.name)
                new_names.update({k: shard.name for k, v in md.tensors.items() if v.shard == shard})
                continue
            tensors = load_shard(shard)
            for name in names:
                if name not in pending:
                    t0 = time.perf_counter()
                    parts = {}
                    for part in _PARTS:
                        info = md.tensors.get(f"{name}.{part}")
                        if info is not None:
                            key = f"{name}.{part}"
                            parts[part] = tensors[key] if info.shard == shard else read_tensor(info)
                    qp = md.quant_params(name) if md.is_quantized(name) else None
                    mod = targets.get(name)
                    factors = apply_control(mod, control, seed) if mod is not None else None
                    out = fuse_module(parts, qp, factors, requant, out_bits)
                    mx.eval(list(out.values()))
                    pending[name] = out
                    if mod is not None:
                        norms = delta_norms(factors.a, factors.b, factors.scale) if factors is not None else None
                        report.modules.append(
                            dict(
                                module=name,
                                layer=layer_index(name),
                                experts=mod.experts,
                                bits=qp[0] if qp else None,
                                group_size=qp[1] if qp else None,
                                out_bits=(out_bits or qp[0]) if qp and requant != "dequantize" else None,
                                rank=mod.rank,
                                dora=mod.magnitude is not None,
                                delta_norm=None if norms is None else float(np.sqrt(np.sum(np.square(norms)))),
                                seconds=round(time.perf_counter() - t0, 4),
                            )
                        )
                        bar.set_postfix_str(f"{name} {time.perf_counter() - t0:.2f}s")
                        bar.update(1)
                out = pending[name]
                for part in _PARTS:
                    key = f"{name}.{part}"
                    info = md.tensors.get(key)
                    if info is None or info.shard != shard:
                        continue
                    if part in out:
                        tensors[key] = out.pop(part)
                    else:
                        del tensors[key]  # dequantized: scales and biases are gone
                if not any(
                    md.tensors.get(f"{name}.{p}") is not None and md.tensors[f"{name}.{p}"].shard != shard and p in out
                    for p in _PARTS
                ):
                    pending.pop(name)
            save_shard(tensors, tmp / shard.name)
            new_names.update({k: shard.name for k in tensors})
            report.rewritten_shards.append(shard.name)
            del tensors
            mx.clear_cache()  # MLX keeps freed buffers for reuse; give them back so the peak is one shard
        bar.close()
        cfg = _updated_config(md.config, targets, md, requant, out_bits)
        if cfg == md.config:
            shutil.copy2(md.path / "config.json", tmp / "config.json")
        else:
            atomic.write_text(tmp / "config.json", json.dumps(cfg, indent=4) + "\n")
        if (md.path / INDEX_NAME).is_file():
            index = json.loads((md.path / INDEX_NAME).read_text())
            index["weight_map"] = dict(sorted(new_names.items()))
            from reqnoise.fuse.model_io import read_safetensors_header

            total = sum(
                off[1] - off[0]
                for shard in md.shards
                for _, _, off in read_safetensors_header(tmp / shard.name).values()
            )
            index.setdefault("metadata", {})["total_size"] = total
            atomic.write_text(tmp / INDEX_NAME, json.dumps(index, indent=4) + "\n")
        report.seconds = round(time.perf_counter() - t_start, 3)
        atomic.write_text(tmp / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def apply_full_weights(model, adapter_path, save_path, *, overwrite=False) -> dict:
    """Write ``model`` with the tensors of a full fine-tune (``fine_tune_type = "full"``: the adapter file
    holds whole weights) substituted, shard by shard; every other file is copied."""
    model, adapter_path, save_path = Path(model), Path(adapter_path), Path(save_path)
    _check_paths(model, adapter_path, save_path)
    md = open_model_dir(model)
    from reqnoise.jsonl import read_json

    cfg = read_json(adapter_path / "adapter_config.json", "adapter config")
    if cfg.get("fine_tune_type") != "full":
        raise ReqnoiseError(
            f"{adapter_path} is not a full fine-tune (fine_tune_type {cfg.get('fine_tune_type')!r}); use fuse_model"
        )
    new = mx.load(str(adapter_path / "adapters.safetensors"))
    unknown = [k for k in new if k not in md.tensors]
    if unknown:
        raise ReqnoiseError(f"{adapter_path}: {len(unknown)} tensor(s) not in {model}, e.g. {unknown[0]!r}")
    for k, v in new.items():
        if tuple(v.shape) != md.tensors[k].shape:
            raise ReqnoiseError(f"{adapter_path}: {k} has shape {tuple(v.shape)}, the model's is {md.tensors[k].shape}")
    with atomic.atomic_dir(save_path, overwrite=overwrite) as tmp:
        _copy_other_files(md, tmp)
        for shard in md.shards:
            names = [k for k, v in md.tensors.items() if v.shard == shard and k in new]
            if not names:
                shutil.copyfile(shard, tmp / shard.name)
                continue
            tensors = load_shard(shard)
            for k in names:
                tensors[k] = new[k].astype(tensors[k].dtype)
            save_shard(tensors, tmp / shard.name)
            del tensors
            mx.clear_cache()
    return {"replaced_tensors": len(new)}
