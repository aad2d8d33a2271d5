"""Fusing a multi-shard model whose modules straddle shard boundaries (a module's weight in one shard, its
scales and biases in the next; one module spread over three shards), against mlx-lm's own fuse of the same
model and adapter; the output's index is checked against the shards' own headers (read with safetensors)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from fuse_helpers import make_adapter, weights
from reqnoise.fuse.model import fuse_model

INDEX = "model.safetensors.index.json"
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I32": 4}  # safetensors dtype names
# module -> the shard (offset from its layer's shard) of its weight, scales and biases
STRADDLE = {
    "model.layers.0.self_attn.q_proj": (0, 1, 1),  # adapter target: weight | scales + biases
    "model.layers.1.mlp.switch_mlp.up_proj": (0, 1, 2),  # adapter target (experts) over three shards
    "model.layers.2.self_attn.k_proj": (0, 0, 1),  # not a target: rewritten only by --requant dequantize
}


def _shard_of(name: str) -> int:
    """Shard 0: embeddings, final norm and head (no adapter target: copied as is by a LoRA fuse); layer L's
    tensors: shard L + 1, except the straddling parts, which move one or two shards on."""
    if ".layers." not in name:
        return 0
    layer = int(name.split(".layers.")[1].split(".")[0])
    module, part = name.rsplit(".", 1)
    if module in STRADDLE and part in ("weight", "scales", "biases"):
        return layer + 1 + STRADDLE[module][("weight", "scales", "biases").index(part)]
    return layer + 1


def _reshard(src: Path, dst: Path) -> dict:
    """Copy the model at ``src`` to ``dst`` with its tensors spread over shards by ``_shard_of``; returns the
    weight map written to the index."""
    tensors = weights(src)
    n = max(_shard_of(k) for k in tensors) + 1
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.startswith("model") or not f.name.endswith((".safetensors", ".json")):
            shutil.copy2(f, dst / f.name)
    weight_map = {}
    for s in range(n):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        part = {k: v for k, v in tensors.items() if _shard_of(k) == s}
        mx.save_safetensors(str(dst / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    total = sum(v.nbytes for v in tensors.values())
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=4))
    return weight_map


@pytest.fixture(scope="module")
def sharded(toy_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    weight_map = _reshard(Path(toy_model_dir), root / "model")
    adapter = make_adapter(root / "model", root / "lora")
    return root / "model", adapter, weight_map


def _mlx_lm_fuse(model, adapter, out, *extra):
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model), "--adapter-path", str(adapter)]
        + ["--save-path", str(out), *extra],
        check=True,
        capture_output=True,
    )
    return out


def _check_index(out: Path) -> dict:
    """The output's index against the shards themselves: every tensor listed once, in the file that holds it,
    and total_size the sum of the tensors' bytes."""
    index = json.loads((out / INDEX).read_text())
    held, nbytes = {}, 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as fh:
            for k in fh.keys():
                assert k not in held, f"{k} in {held.get(k)} and {f.name}"
                held[k] = f.name
                sl = fh.get_slice(k)
                nbytes += int(np.prod(sl.get_shape())) * ITEMSIZE[sl.get_dtype()]
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == nbytes
    return held


def test_the_resharded_model_straddles_as_intended(sharded):
    model, _, weight_map = sharded
    for module, offsets in STRADDLE.items():
        files = [weight_map[f"{module}.{p}"] for p in ("weight", "scales", "biases")]
        assert len(set(files)) == len(set(offsets)) > 1, (module, files)
    assert len(list(model.glob("*.safetensors"))) == 5


def test_fresh_fuse_of_straddling_modules_equals_mlx_lm(sharded, tmp_path):
    model, adapter, weight_map = sharded
    report = fuse_model(model, adapter, tmp_path / "ours", progress=False)
    theirs = weights(_mlx_lm_fuse(model, adapter, tmp_path / "theirs"))
    ours = weights(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    # Tensors stay in the shards they came from; the shard without a target is copied, not rewritten.
    assert _check_index(tmp_path / "ours") == weight_map
    first = "model-00001-of-00005.safetensors"
    assert report.copied_shards == [first] and len(report.rewritten_shards) == 4
    assert (tmp_path / "ours" / first).read_bytes() == (model / first).read_bytes()
    straddlers = [m for m in STRADDLE if m in {r["module"] for r in report.modules}]
    assert len(straddlers) == 2 and len(report.modules) == 16


def test_dequantize_fuse_drops_straddling_scales_from_the_index(sharded, tmp_path):
    model, adapter, weight_map = sharded
    fuse_model(model, adapter, tmp_path / "ours", requant="dequantize", progress=False)
    theirs = weights(_mlx_lm_fuse(model, adapter, tmp_path / "theirs", "--dequantize"))
    ours = weights(tmp_path / "ours")
    assert set(ours) == set(theirs) and not any(k.endswith((".scales", ".biases")) for k in ours)
    for k in theirs:
        # Same float arithmetic as mlx-lm; only the matmul's summation order may differ (float32 ulps).
        np.testing.assert_allclose(
            np.array(ours[k].astype(mx.float32)), np.array(theirs[k].astype(mx.float32)), rtol=1e-5, atol=1e-6
        )
    held = _check_index(tmp_path / "ours")
    assert held == {k: v for k, v in weight_map.items() if k in ours}
