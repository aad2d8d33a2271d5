"""Model-level fusion on the embedded toy model, against mlx-lm's own fuse as the oracle."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from fuse_helpers import dequantized, make_adapter, weights
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import load_adapter
from reqnoise.fuse.model import fuse_model
from reqnoise.fuse.options import FuseOptions


@pytest.fixture(scope="module")
def adapter(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("ad") / "lora")


@pytest.fixture(scope="module")
def mlx_lm_fused(toy_model_dir, adapter, tmp_path_factory):
    """What `python -m mlx_lm fuse` writes (run as mlx-lm's users run it)."""
    out = tmp_path_factory.mktemp("mlxlm")
    res = {}
    for name, extra in (("fresh", []), ("dequantize", ["--dequantize"])):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "fuse",
                "--model",
                str(toy_model_dir),
                "--adapter-path",
                str(adapter),
                "--save-path",
                str(out / name),
            ]
            + extra,
            check=True,
            capture_output=True,
        )
        res[name] = out / name
    return res


def test_fresh_is_bit_identical_to_mlx_lm_fuse(toy_model_dir, adapter, mlx_lm_fused, tmp_path):
    report = fuse_model(toy_model_dir, adapter, tmp_path / "out", progress=False)
    ours, theirs = weights(tmp_path / "out"), weights(mlx_lm_fused["fresh"])
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    assert len(report.modules) == 16 and (tmp_path / "out" / "fuse_report.json").is_file()
    assert json.loads((tmp_path / "out" / "fuse_report.json").read_text())["requant"] == "fresh"


def test_fresh_random_factors_within_code_tolerance(toy_model_dir, tmp_path):
    ad = make_adapter(toy_model_dir, tmp_path / "ad", dyadic=False, size=0.05, seed=3)
    fuse_model(toy_model_dir, ad, tmp_path / "ours", progress=False)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(toy_model_dir),
            "--adapter-path",
            str(ad),
            "--save-path",
            str(tmp_path / "theirs"),
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    differ = total = 0
    for k in theirs:
        if ours[k].dtype == mx.uint32:
            differ += int(mx.sum(ours[k] != theirs[k]).item())
            total += ours[k].size
        else:
            assert ours[k].shape == theirs[k].shape
    # Packed words, each holding several codes: an upper bound on the share of codes that moved.
    assert differ / total <= 1e-4, differ / total


def test_dequantize_matches_mlx_lm_within_float_tolerance(toy_model_dir, adapter, mlx_lm_fused, tmp_path):
    fuse_model(toy_model_dir, adapter, tmp_path / "out", requant="dequantize", progress=False)
    ours, theirs = weights(tmp_path / "out"), weights(mlx_lm_fused["dequantize"])
    assert set(ours) == set(theirs) and not any(k.endswith(".scales") for k in ours)
    for k in theirs:
        # Same float arithmetic; only the matmul's summation order may differ (float32 ulps).
        np.testing.assert_allclose(
            np.array(ours[k].astype(mx.float32)),
            np.array(theirs[k].astype(mx.float32)),
            rtol=1e-5,
            atol=1e-6,
            err_msg=k,
        )
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg


def test_keep_grid_zero_control_is_the_input_model(toy_model_dir, adapter, tmp_path):
    fuse_model(toy_model_dir, adapter, tmp_path / "out", requant="keep-grid", control="zero", progress=False)
    ours, base = weights(tmp_path / "out"), weights(toy_model_dir)
    assert set(ours) == set(base)
    for k in base:
        assert mx.array_equal(ours[k], base[k]).item(), k
        assert ours[k].dtype == base[k].dtype
    assert (tmp_path / "out" / "config.json").read_bytes() == (toy_model_dir / "config.json").read_bytes()


def test_options_object_is_the_keywords(toy_model_dir, adapter, tmp_path):
    opts = FuseOptions(requant="keep-grid", control="zero", layers=[1])
    report = fuse_model(toy_model_dir, adapter, tmp_path / "out", options=opts, progress=False)
    ours, base = weights(tmp_path / "out"), weights(toy_model_dir)
    assert all(mx.array_equal(ours[k], base[k]).item() for k in base)
    assert (report.requant, report.control, report.layers, len(report.modules)) == ("keep-grid", "zero", [1], 4)
    saved = json.loads((tmp_path / "out" / "fuse_report.json").read_text())
    assert (saved["requant"], saved["control"], saved["layers"]) == ("keep-grid", "zero", [1])
    with pytest.raises(ReqnoiseError, match="not both"):
        fuse_model(toy_model_dir, adapter, tmp_path / "o2", options=opts, control="random", progress=False)


def test_fresh_zero_control_is_the_requantization_artifact(toy_model_dir, adapter, tmp_path):
    fuse_model(toy_model_dir, adapter, tmp_path / "out", control="zero", progress=False)
    ours, base = weights(tmp_path / "out"), weights(toy_model_dir)
    k = "model.layers.1.mlp.switch_mlp.down_proj"
    want = mx.quantize(
        mx.dequantize(base[f"{k}.weight"], base[f"{k}.scales"], base[f"{k}.biases"], group_size=64, bits=3),
        group_size=64,
        bits=3,
    )
    assert mx.array_equal(ours[f"{k}.weight"], want[0]).item()
    assert not mx.array_equal(ours[f"{k}.weight"], base[f"{k}.weight"]).item()  # the artifact is real
    assert mx.array_equal(ours["model.layers.1.mlp.gate.weight"], base["model.layers.1.mlp.gate.weight"]).item()


def _dense_deltas(adapter_dir):
    """{module: scale * B @ A} in float64, read straight from mlx-lm's adapter files (its layouts: LoRALinear
    stores lora_a [in, r] and lora_b [r, out], LoRASwitchLinear [E, r, in] and [E, out, r])."""
    scale = json.loads((adapter_dir / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    tensors = {k: np.array(v, dtype=np.float64) for k, v in mx.load(str(adapter_dir / "adapters.safetensors")).items()}
    out = {}
    for k in tensors:
        if k.endswith(".lora_a"):
            module = k[: -len(".lora_a")]
            a, b = tensors[k], tensors[f"{module}.lora_b"]
            out[module] = scale * (b @ a if a.ndim == 3 else b.T @ a.T)
    return out


def test_random_control_matches_the_adapters_delta_norms(toy_model_dir, adapter, tmp_path):
    fuse_model(toy_model_dir, adapter, tmp_path / "r1", requant="dequantize", control="random", seed=1, progress=False)
    fuse_model(toy_model_dir, adapter, tmp_path / "r2", requant="dequantize", control="random", seed=2, progress=False)
    fuse_model(toy_model_dir, adapter, tmp_path / "r1b", requant="dequantize", control="random", seed=1, progress=False)
    dense = _dense_deltas(adapter)
    assert len(dense) == 16
    for module, own in dense.items():
        base = dequantized(toy_model_dir, module)
        eff = dequantized(tmp_path / "r1", module) - base
        # Per expert (or for the whole dense module): the norm of the dense delta, summed in numpy.
        want = np.sqrt((own**2).sum(axis=(-1, -2)))
        got = np.sqrt((eff.astype(np.float64) ** 2).sum(axis=(-1, -2)))
        np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=module)
        # ... and its direction is not the adapter's
        cos = (eff * own).sum() / (np.linalg.norm(eff) * np.linalg.norm(own))
        assert abs(cos) < 0.3, (module, cos)
        other = dequantized(tmp_path / "r2", module) - base
        assert not np.allclose(other, eff)
    for f in ("model.safetensors",):
        assert (tmp_path / "r1" / f).read_bytes() == (tmp_path / "r1b" / f).read_bytes()


def test_layers_touch_only_those_layers(toy_model_dir, adapter, tmp_path):
    report = fuse_model(toy_model_dir, adapter, tmp_path / "out", layers=[1, 3], progress=False)
    ours, base = weights(tmp_path / "out"), weights(toy_model_dir)
    changed = {k for k in base if not mx.array_equal(ours[k], base[k]).item()}
    assert changed and all(k.startswith(("model.layers.1.", "model.layers.3.")) for k in changed)
    assert {m["layer"] for m in report.modules} == {1, 3}
    assert len(report.ignored_modules) == 8


def test_output_loads_and_generates_in_mlx_lm(toy_model_dir, adapter, tmp_path):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    for requant, out_bits in (("fresh", None), ("keep-grid", None), ("fresh", 8), ("dequantize", None)):
        out = tmp_path / f"{requant}-{out_bits}"
        fuse_model(toy_model_dir, adapter, out, requant=requant, out_bits=out_bits, progress=False)
        model, tok = mlx_lm.load(str(out))
        text = mlx_lm.generate(model, tok, "The capital of", max_tokens=5, sampler=make_sampler(temp=0.0))
        assert isinstance(text, str)
    cfg = json.loads((tmp_path / "fresh-8" / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.mlp.switch_mlp.down_proj"] == {"group_size": 64, "bits": 8}
    w = weights(tmp_path / "fresh-8")
    assert w["model.layers.0.mlp.switch_mlp.down_proj.weight"].shape == (8, 128, 128 * 8 // 32)


def test_out_bits_8_keeps_the_adapter(toy_model_dir, tmp_path):
    """A small delta is mostly rounded away at 3 bits and survives at 8 (the escape hatch)."""
    ad = make_adapter(toy_model_dir, tmp_path / "ad", dyadic=False, size=0.01, seed=5)
    mod = "model.layers.2.mlp.switch_mlp.down_proj"
    m = load_adapter(ad).modules[mod]
    intended = np.array(m.scale * m.b @ m.a)
    base = dequantized(toy_model_dir, mod)

    def cosine(out):
        eff = dequantized(out, mod) - base
        return (eff * intended).sum() / (np.linalg.norm(eff) * np.linalg.norm(intended))

    fuse_model(toy_model_dir, ad, tmp_path / "f3", progress=False)
    fuse_model(toy_model_dir, ad, tmp_path / "f8", out_bits=8, progress=False)
    assert cosine(tmp_path / "f8") > 0.9 > 0.5 > cosine(tmp_path / "f3")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dora_adapter_fuses_like_mlx_lm(tmp_path, dtype):
    """Every tensor equal to mlx-lm's DoRA fuse, dtypes included: mlx-lm's float32 row factor makes a DoRA
    module's new scales and biases float32 even in a bfloat16 model, and reqnoise writes the same."""
    from reqnoise.toy.model import build_toy_model

    model = build_toy_model(tmp_path / "toy8", bits=8, dtype=dtype)
    ad = make_adapter(
        model, tmp_path / "dora", keys=["self_attn.q_proj", "self_attn.o_proj"], dyadic=False, fine_tune_type="dora"
    )
    fuse_model(model, ad, tmp_path / "ours", progress=False)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(model),
            "--adapter-path",
            str(ad),
            "--save-path",
            str(tmp_path / "theirs"),
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    dora_scales = [k for k in theirs if k.endswith(("q_proj.scales", "o_proj.scales"))]
    assert len(dora_scales) == 8
    assert all(ours[k].dtype == mx.float32 for k in dora_scales)
    assert all(ours[k].dtype == getattr(mx, dtype) for k in ours if k.endswith("v_proj.scales"))


def _reshard(src, dst, shard_of):
    """Copy model directory ``src`` to ``dst`` with its tensors spread over shards as ``shard_of(name)``
    (0-based) says, plus the index mlx-lm and transformers read."""
    import shutil

    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, dst / f.name)
    tensors = weights(src)
    n = 1 + max(shard_of(k) for k in tensors)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        mx.save_safetensors(
            str(dst / name), {k: v for k, v in tensors.items() if shard_of(k) == i}, metadata={"format": "mlx"}
        )
    weight_map = {k: names[shard_of(k)] for k in sorted(tensors)}
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


def test_modules_that_straddle_shards_fuse_like_mlx_lm(toy_model_dir, adapter, mlx_lm_fused, tmp_path):
    # Expert stack of layer 1: weight in shard 0, scales/biases in shard 2; layer 2: the other way round, with
    # its biases alone in a shard of their own; everything else in shard 1 (rewritten for the other targets).
    straddle = {
        "model.layers.1.mlp.switch_mlp.down_proj.weight": 0,
        "model.layers.1.mlp.switch_mlp.down_proj.scales": 2,
        "model.layers.1.mlp.switch_mlp.down_proj.biases": 2,
        "model.layers.2.mlp.switch_mlp.up_proj.weight": 2,
        "model.layers.2.mlp.switch_mlp.up_proj.scales": 0,
        "model.layers.2.mlp.switch_mlp.up_proj.biases": 3,
    }
    names = _reshard(toy_model_dir, tmp_path / "sharded", lambda k: straddle.get(k, 1))
    report = fuse_model(tmp_path / "sharded", adapter, tmp_path / "out", progress=False)
    assert sorted(report.rewritten_shards) == names and len(report.modules) == 16
    ours, theirs = weights(tmp_path / "out"), weights(mlx_lm_fused["fresh"])
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and mx.array_equal(ours[k], theirs[k]).item(), k
    # each tensor stays in its shard, and the index says so; total_size is the tensors' bytes
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: names[straddle.get(k, 1)] for k in sorted(theirs)}
    for name in names:
        held = set(mx.load(str(tmp_path / "out" / name)))
        assert held == {k for k, v in index["weight_map"].items() if v == name}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in theirs.values())


def test_dequantize_drops_scales_from_every_shard_they_straddle(toy_model_dir, adapter, mlx_lm_fused, tmp_path):
    straddle = {
        "model.layers.1.mlp.switch_mlp.down_proj.scales": 0,
        "model.layers.1.mlp.switch_mlp.down_proj.biases": 2,
    }
    names = _reshard(toy_model_dir, tmp_path / "sharded", lambda k: straddle.get(k, 1))
    fuse_model(tmp_path / "sharded", adapter, tmp_path / "out", requant="dequantize", progress=False)
    ours, theirs = weights(tmp_path / "out"), weights(mlx_lm_fused["dequantize"])
    assert set(ours) == set(theirs)
    k = "model.layers.1.mlp.switch_mlp.down_proj.weight"
    np.testing.assert_allclose(np.array(ours[k]), np.array(theirs[k]), rtol=1e-5, atol=1e-6)
    # the shards that held only the scales and biases are left empty, and the index maps nothing to them
    assert not mx.load(str(tmp_path / "out" / names[0])) and not mx.load(str(tmp_path / "out" / names[2]))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: names[1] for k in sorted(theirs)}
