"""Model-level fusion: fuse an mlx-lm adapter (or a control) into a quantized model directory.

Streams one shard at a time and one target module at a time; peak memory is bounded by the largest shard
plus one module's output, not by the model. The output directory appears only when complete.
"""

import json
import shutil
import time
from copy import deepcopy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from reqnoise import __version__, atomic
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import check_against_model, load_adapter
from reqnoise.fuse.calibration import DEFAULT_CALIB_TOKENS, MIN_EXPERT_TOKENS, collect_inputs, load_calibration
from reqnoise.fuse.controls import apply_control, delta_norms
from reqnoise.fuse.model_io import (
    INDEX_NAME,
    layer_index,
    load_shard,
    open_model_dir,
    read_safetensors_header,
    save_shard,
)
from reqnoise.fuse.module import PARTS, fuse_module, module_parts
from reqnoise.fuse.options import FuseOptions
from reqnoise.jsonl import read_json

REPORT_NAME = "fuse_report.json"


@dataclass
class FuseReport:
    """What a fuse did; written as ``fuse_report.json`` beside the weights, the options' fields at the top
    level (``report.requant`` etc. read them too)."""

    model: str
    adapter: str
    save_path: str
    options: FuseOptions  # layers sorted
    fine_tune_type: str
    modules: list = field(default_factory=list)  # one dict per fused module
    ignored_modules: list = field(default_factory=list)  # adapter modules left out by --layers
    rewritten_shards: list = field(default_factory=list)
    copied_shards: list = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict | None = None  # calibrated: data source, sha256 and token counts
    reqnoise_version: str = __version__

    def __getattr__(self, name):
        # only called for names the dataclass lacks; "options" itself must not recurse while unset
        if name != "options" and name in FuseOptions.names():
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(value.to_dict() if f.name == "options" else {f.name: deepcopy(value)})
        return out


def _check_paths(model: Path, adapter: Path, save: Path) -> None:
    m, a, s = model.resolve(), adapter.resolve(), save.resolve()
    for label, p in (("model directory", m), ("adapter directory", a)):
        if s == p or p in s.parents:
            raise ReqnoiseError(f"save path {save} is the {label} {p} or inside it; choose another path")
        if s in p.parents:
            raise ReqnoiseError(f"save path {save} contains the {label} {p}; replacing it would destroy the input")


def _copy_other_files(md, dst: Path, skip=()) -> None:
    """Copy every file and folder of the model directory except its shards and the names in ``skip``."""
    for item in sorted(md.path.iterdir()):
        if item.name in skip or item in md.shards:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)


def _select_targets(adapter, layers):
    """The adapter's modules inside ``layers`` (None: all) and the names of those left out."""
    layer_set = None if layers is None else {int(x) for x in layers}
    keep, ignored = {}, []
    for name, mod in adapter.modules.items():
        if layer_set is not None and layer_index(name) not in layer_set:
            ignored.append(name)
        else:
            keep[name] = mod
    if not keep:
        raise ReqnoiseError(
            f"--layers {sorted(layer_set)} selects none of the adapter's "
            f"{len(adapter.modules)} modules (layers present: "
            f"{sorted({layer_index(m) for m in adapter.modules} - {None})})"
        )
    return keep, ignored


def _plan_shards(md, targets, options: FuseOptions) -> dict:
    """Shard path -> sorted names of the modules with a tensor in it that must be rewritten: the targets,
    and with ``dequantize`` every quantized module. A module that straddles two shards is in both."""
    rewrite = set(targets)
    if options.requant == "dequantize":
        rewrite.update(name for name in md.modules() if md.is_quantized(name))
    plan: dict = {}
    for name in rewrite:
        for part in PARTS:
            info = md.tensors.get(f"{name}.{part}")
            if info is not None:
                plan.setdefault(info.shard, set()).add(name)
    return {shard: sorted(names) for shard, names in plan.items()}


def _fuse_target(md, name, mod, options: FuseOptions, shard, loaded, calibration=None):
    """Fuse one module to evaluated tensors; returns ``(tensors by suffix, report entry or None)``. ``mod``
    None: a module rewritten only because ``dequantize`` removes every quantization (no delta, no entry)."""
    t0 = time.perf_counter()
    parts = module_parts(md, name, shard, loaded)
    qp = md.quant_params(name) if md.is_quantized(name) else None
    mode = md.quant_mode(name) if qp is not None else None
    factors = apply_control(mod, options.control, options.seed) if mod is not None else None
    cal = None if calibration is None or mod is None else calibration.get(name)
    out = fuse_module(parts, qp, factors, options, mode or "affine", calibration=cal)
    mx.eval(list(out.values()))
    if mod is None:
        return out, None
    norms = delta_norms(factors.a, factors.b, factors.scale) if factors is not None else None
    out_qp = options.output_format(qp, mode or "affine")
    entry = dict(
        module=name,
        layer=layer_index(name),
        experts=mod.experts,
        bits=qp[0] if qp else None,
        group_size=qp[1] if qp else None,
        out_bits=out_qp[0] if out_qp else None,
        mode=mode,
        out_mode=out_qp[2] if out_qp else None,
        rank=mod.rank,
        dora=mod.magnitude is not None,
        delta_norm=None if norms is None else float(np.sqrt(np.sum(np.square(norms)))),
        seconds=round(time.perf_counter() - t0, 4),
    )
    if cal is not None:
        entry["calibration"] = dict(
            tokens_per_expert=cal.token_counts(),
            keep_grid_fallback=sorted(int(e) for e in getattr(cal, "fallback", [])),
        )
        entry["calibration_fallback_experts"] = len(entry["calibration"]["keep_grid_fallback"])
    return out, entry


def _place(md, name, shard, out: dict, tensors: dict) -> None:
    """Move the parts of ``out`` that live in ``shard`` into its tensors (a part ``out`` lacks: a
    dequantized module's scales/biases, or an fp output's biases, dropped; a part the model lacks: biases
    of an fp module re-quantized to affine, placed beside its weight). What stays in ``out`` belongs to
    another shard."""
    for part in PARTS:
        key = f"{name}.{part}"
        info = md.tensors.get(key)
        if info is None and part in out:
            info = md.tensors[f"{name}.weight"]
        if info is None or info.shard != shard:
            continue
        if part in out:
            tensors[key] = out.pop(part)
        else:
            del tensors[key]


def _write_shard(md, shard, names, dst: Path, fuse_one, pending: dict) -> list:
    """Rewrite one shard with the modules ``names`` fused; returns the tensor names it now holds.

    ``fuse_one(name, shard, loaded)`` fuses a module; ``pending`` carries, from one shard to the next, the
    outputs of modules that straddle two shards (fused once, at their first shard, placed in both).
    """
    tensors = load_shard(shard)
    for name in names:
        if name not in pending:
            pending[name] = fuse_one(name, shard, tensors)
        out = pending[name]
        _place(md, name, shard, out, tensors)
        if not out:  # every part placed: the module is done
            pending.pop(name)
    save_shard(tensors, dst / shard.name)
    written = list(tensors)
    del tensors
    mx.clear_cache()  # MLX keeps freed buffers for reuse; give them back so the peak is one shard
    return written


def _write_config(md, dst: Path, targets, options: FuseOptions) -> None:
    """config.json: copied as is unless quantization changed (``dequantize`` drops it; ``out_bits`` or
    ``out_mode`` add a per-module override for each fused quantized module, naming its ``mode`` unless both
    modes are affine: mlx-lm passes an override whole to ``to_quantized``, whose mode defaults to affine)."""
    cfg = json.loads(json.dumps(md.config))
    if options.requant == "dequantize":
        cfg.pop("quantization", None)
        cfg.pop("quantization_config", None)
    elif options.out_bits or options.out_mode:
        for key in ("quantization", "quantization_config"):
            if isinstance(cfg.get(key), dict):
                for name in targets:
                    qp = md.quant_params(name)
                    if qp is not None and md.is_quantized(name):
                        mode = md.quant_mode(name)
                        bits, group, out_mode = options.output_format(qp, mode)
                        cfg[key][name] = {"group_size": group, "bits": bits}
                        if out_mode != "affine" or mode != "affine":
                            cfg[key][name]["mode"] = out_mode
    if cfg == md.config:
        shutil.copy2(md.path / "config.json", dst / "config.json")
    else:
        atomic.write_text(dst / "config.json", json.dumps(cfg, indent=4) + "\n")


def _write_index(md, dst: Path, new_names: dict) -> None:
    """The shard index (if the model has one) with the new weight map and the new total size."""
    if not (md.path / INDEX_NAME).is_file():
        return
    index = json.loads((md.path / INDEX_NAME).read_text())
    index["weight_map"] = dict(sorted(new_names.items()))
    total = sum(
        off[1] - off[0] for shard in md.shards for _, _, off in read_safetensors_header(dst / shard.name).values()
    )
    index.setdefault("metadata", {})["total_size"] = total
    atomic.write_text(dst / INDEX_NAME, json.dumps(index, indent=4) + "\n")


def fuse_model(
    model,
    adapter_path,
    save_path,
    *,
    options: FuseOptions | None = None,
    overwrite=False,
    progress=True,
    **fields,
) -> FuseReport:
    """Fuse an mlx-lm adapter into a model directory and write a new model directory.

    Args:
        model: mlx-lm model directory (float, or quantized in any MLX mode, per module as its config says).
        adapter_path: mlx-lm adapter directory (LoRA on dense and switch layers, DoRA on dense layers).
        save_path: output directory; written to a temporary sibling and renamed into place when complete.
        options: a FuseOptions; or, equivalently, its fields as keywords (not both):
        requant: "fresh" (what mlx-lm's fuse does), "keep-grid" (keep every group's scale/bias: a zero delta
            gives the identical model), "calibrated" (keep the grid, codes by error feedback from calibration
            activations of base + adapter; zero delta gives the identical model) or "dequantize" (float output).
        calib_data, calib_tokens: calibrated only: the calibration data (mlx-lm dataset formats) and token cap.
        out_bits: fresh only: re-quantize the fused modules at this width (per-module config override).
        out_mode: fresh only: re-quantize the fused modules into this MLX mode (the override names it).
        control: "none" (the adapter), "zero" (zero delta through the same pipeline) or "random"
            (norm-matched random delta per module and expert, from ``seed``).
        layers: fuse only modules in these layer indices; the rest of the adapter is ignored (reported).
        seed: the random control's seed.
        overwrite: replace an existing ``save_path``.

    Returns:
        A FuseReport (also written to ``save_path/fuse_report.json``).
    """
    t_start = time.perf_counter()
    opts = FuseOptions.merge(options, fields, "fuse_model").check()
    model, adapter_path, save_path = Path(model), Path(adapter_path), Path(save_path)
    _check_paths(model, adapter_path, save_path)
    if save_path.exists() and not overwrite:
        raise ReqnoiseError(f"{save_path} already exists (pass --overwrite to replace it)")
    md = open_model_dir(model)
    adapter = load_adapter(adapter_path)
    check_against_model(adapter, md)
    if md.is_hadamard_pack() and (opts.requant == "dequantize" or opts.out_bits or opts.out_mode):
        raise ReqnoiseError(
            f"{model} is a Hadamard pack: its config must keep the one quantization block it has, so "
            "--requant dequantize, --out-bits and --out-mode would write a model mlx-lm refuses to load"
        )
    targets, ignored = _select_targets(adapter, opts.layers)
    for name in targets:  # an output format a module cannot take is refused before any work
        if md.is_quantized(name):
            opts.output_format(md.quant_params(name), md.quant_mode(name))
    report = FuseReport(
        str(model),
        str(adapter_path),
        str(save_path),
        replace(opts, layers=None if opts.layers is None else sorted({int(x) for x in opts.layers})),
        adapter.fine_tune_type,
        ignored_modules=sorted(ignored),
    )
    plan = _plan_shards(md, targets, opts)
    calibration = None
    if opts.requant == "calibrated":
        # data checked and tokenized first: bad calibration data fails before any model is run or written
        cal_data = load_calibration(model, adapter_path, opts.calib_data, opts.calib_tokens or DEFAULT_CALIB_TOKENS)
        calibration = collect_inputs(model, adapter_path, targets, cal_data)
        report.calibration = dict(
            source=cal_data.source, sha256=cal_data.sha256, format=cal_data.format, tokens=cal_data.tokens,
            sequences=len(cal_data.sequences), min_expert_tokens=MIN_EXPERT_TOKENS,
        )  # fmt: skip

    from tqdm import tqdm

    bar = tqdm(total=len(targets), desc="fuse", unit="module", disable=not progress, leave=False)

    def fuse_one(name, shard, loaded):
        out, entry = _fuse_target(md, name, targets.get(name), opts, shard, loaded, calibration)
        if entry is not None:
            report.modules.append(entry)
            bar.set_postfix_str(f"{name} {entry['seconds']:.2f}s")
            bar.update(1)
        return out

    pending: dict = {}
    new_names: dict = {}  # tensor name -> shard file name, for the index
    with atomic.atomic_dir(save_path, overwrite=overwrite) as tmp:
        _copy_other_files(md, tmp, skip=("config.json", INDEX_NAME, REPORT_NAME))
        for shard in md.shards:
            if shard in plan:
                written = _write_shard(md, shard, plan[shard], tmp, fuse_one, pending)
                report.rewritten_shards.append(shard.name)
            else:
                shutil.copyfile(shard, tmp / shard.name)
                written = [k for k, v in md.tensors.items() if v.shard == shard]
                report.copied_shards.append(shard.name)
            new_names.update(dict.fromkeys(written, shard.name))
        bar.close()
        _write_config(md, tmp, targets, opts)
        _write_index(md, tmp, new_names)
        report.seconds = round(time.perf_counter() - t_start, 3)
        atomic.write_text(tmp / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def apply_full_weights(model, adapter_path, save_path, *, overwrite=False) -> dict:
    """Write ``model`` with the tensors of a full fine-tune (``fine_tune_type = "full"``: the adapter file
    holds whole weights) substituted, shard by shard; every other file is copied."""
    model, adapter_path, save_path = Path(model), Path(adapter_path), Path(save_path)
    _check_paths(model, adapter_path, save_path)
    md = open_model_dir(model)
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
