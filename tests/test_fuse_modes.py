"""fp modes at the model level: the toy qwen3_moe quantized by mlx-lm in mxfp4, nvfp4 and mxfp8 (its routers
stay 8-bit affine through mlx-lm's own predicate: a mixed-mode model), fused by reqnoise and by mlx-lm's own
``mlx_lm fuse``, and measured by the noise analytics. Oracles: mlx-lm's fuse, MLX's quantize/dequantize on the
CPU stream, numpy bit unpacking and hand-computed code spacings."""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

from fuse_helpers import make_adapter, weights
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.model import fuse_model
from reqnoise.noise.report import fp_local_step, noise_report

FP = ("mxfp4", "nvfp4", "mxfp8")
BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}
GROUP = {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
DOWN = "model.layers.0.mlp.switch_mlp.down_proj"
Q = "model.layers.1.self_attn.q_proj"
ROUTER = "model.layers.0.mlp.gate"


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _quantize(src: Path, dst: Path, mode: str) -> Path:
    """The float toy quantized as ``mlx_lm.convert --q-mode mode`` does (quantize_model, save_model)."""
    import mlx_lm.utils as U

    model, cfg = U.load_model(src)
    with _quiet():
        model, cfg = U.quantize_model(model, cfg, None, None, mode=mode)
    dst.mkdir(parents=True)
    U.save_model(dst, model)
    U.save_config(cfg, config_path=dst / "config.json")
    for f in src.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    return dst


def _mlx_lm_fuse(model, adapter, out, *extra) -> Path:
    """mlx-lm's own fuse command, in this process (its ``main`` with the arguments its users type)."""
    import mlx_lm.fuse

    argv = ["mlx_lm.fuse", "--model", str(model), "--adapter-path", str(adapter), "--save-path", str(out), *extra]
    with mock.patch.object(sys, "argv", argv), _quiet():
        mlx_lm.fuse.main()
    return Path(out)


@pytest.fixture(scope="module")
def built(toy_model_dir_fp, tmp_path_factory):
    """Per mode: the quantized model, and mlx-lm's fuse (fresh and --dequantize) of the dyadic adapter."""
    root = tmp_path_factory.mktemp("modes")
    adapter = make_adapter(toy_model_dir_fp, root / "lora")
    out = {"adapter": adapter}
    for mode in FP:
        model = _quantize(toy_model_dir_fp, root / mode, mode)
        out[mode] = dict(
            model=model,
            fresh=_mlx_lm_fuse(model, adapter, root / f"{mode}-mlxlm"),
            dequantize=_mlx_lm_fuse(model, adapter, root / f"{mode}-mlxlm-deq", "--dequantize"),
        )
    return out


def _same_tensors(a, b):
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        assert mx.array_equal(a[k], b[k]).item(), k


def test_config_reads_the_mode_per_module(built):
    from reqnoise.fuse.model_io import open_model_dir

    md = open_model_dir(built["mxfp4"]["model"])
    assert md.quant_mode(DOWN) == "mxfp4" and md.quant_params(DOWN) == (4, 32)
    # mlx-lm's predicate writes the router override without a mode: its loader builds it affine
    assert md.quant_mode(ROUTER) == "affine" and md.quant_params(ROUTER) == (8, 64)
    assert md.is_quantized(DOWN) and md.is_quantized(ROUTER)
    assert md.quant_mode("model.layers.0.input_layernorm") is None


@pytest.mark.parametrize("mode", FP)
def test_fresh_is_bit_identical_to_mlx_lm_fuse(built, mode, tmp_path):
    b = built[mode]
    report = fuse_model(b["model"], built["adapter"], tmp_path / "out", progress=False)
    _same_tensors(weights(tmp_path / "out"), weights(b["fresh"]))
    assert {m["mode"] for m in report.modules} == {mode} == {m["out_mode"] for m in report.modules}
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ours["quantization"] == json.loads((b["fresh"] / "config.json").read_text())["quantization"]


@pytest.mark.parametrize("mode", FP)
def test_dequantize_matches_mlx_lm(built, mode, tmp_path):
    b = built[mode]
    fuse_model(b["model"], built["adapter"], tmp_path / "out", requant="dequantize", progress=False)
    ours, theirs = weights(tmp_path / "out"), weights(b["dequantize"])
    assert set(ours) == set(theirs) and not any(k.endswith(".scales") for k in ours)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k  # fp modes dequantize to bfloat16, in both
        # same ops; only the delta's matmul may sum in another order (a bfloat16 ulp at most)
        np.testing.assert_allclose(
            np.array(ours[k].astype(mx.float32)), np.array(theirs[k].astype(mx.float32)), rtol=2**-7, err_msg=k
        )
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("mode", FP)
def test_keep_grid_zero_control_is_the_input_model_tensor_bytes(built, mode, tmp_path):
    src = built[mode]["model"]
    fuse_model(src, built["adapter"], tmp_path / "out", requant="keep-grid", control="zero", progress=False)
    ours, base = weights(tmp_path / "out"), weights(src)
    assert set(ours) == set(base)
    for k in base:  # the shard is rewritten (its header may be laid out differently); every tensor's bytes not
        assert ours[k].dtype == base[k].dtype and bytes(memoryview(ours[k])) == bytes(memoryview(base[k])), k
    for f in sorted(src.iterdir()):
        if f.name == "model.safetensors.index.json":  # rewritten with the new shards' total size
            assert json.loads((tmp_path / "out" / f.name).read_text()) == json.loads(f.read_text())
        elif f.suffix != ".safetensors":
            assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("mode", FP)
def test_calibrated_keeps_each_groups_fp_scale_and_a_zero_delta_returns_the_input(built, mode, tmp_path):
    src = built[mode]["model"]
    base = weights(src)
    fuse_model(src, built["adapter"], tmp_path / "zero", requant="calibrated", control="zero", progress=False)
    zero = weights(tmp_path / "zero")
    assert set(zero) == set(base)
    for k in base:
        assert bytes(memoryview(zero[k])) == bytes(memoryview(base[k])), k
    report = fuse_model(src, built["adapter"], tmp_path / "cal", requant="calibrated", progress=False)
    cal = weights(tmp_path / "cal")
    assert report.modules and {m["mode"] for m in report.modules} >= {mode}
    for k in base:
        if k.endswith(".scales"):  # the grid is kept: every scale's bytes as stored
            assert bytes(memoryview(cal[k])) == bytes(memoryview(base[k])), k
    assert any(not mx.array_equal(cal[k], base[k]).item() for k in base if k.endswith(".weight")), "nothing moved"
    import mlx_lm

    mlx_lm.load(str(tmp_path / "cal"))  # mlx-lm reads it


@pytest.mark.parametrize("mode", FP)
def test_fresh_zero_control_is_mlx_own_round_trip(built, mode, tmp_path):
    src = built[mode]["model"]
    fuse_model(src, built["adapter"], tmp_path / "out", control="zero", progress=False)
    ours, base = weights(tmp_path / "out"), weights(src)
    cfg = json.loads((src / "config.json").read_text())["quantization"]
    changed = 0
    for name in (DOWN, Q):
        with mx.stream(mx.cpu):
            w = mx.dequantize(base[f"{name}.weight"], base[f"{name}.scales"], None, GROUP[mode], BITS[mode], mode)
            wq, s = mx.quantize(w, GROUP[mode], BITS[mode], mode=mode)
        assert mx.array_equal(ours[f"{name}.weight"], wq).item() and mx.array_equal(ours[f"{name}.scales"], s).item()
        assert f"{name}.biases" not in ours
        changed += int(mx.sum(wq != base[f"{name}.weight"]).item())
    assert cfg["mode"] == mode
    if mode == "mxfp4":
        assert changed > 0  # the artifact the zero control exists to show (mxfp4's scale rounds up)


def test_out_mode_affine_8_from_mxfp4_is_mlx_op_chain_and_loads(built, tmp_path):
    import mlx_lm
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    src = built["mxfp4"]["model"]
    out = tmp_path / "out"
    report = fuse_model(src, built["adapter"], out, out_mode="affine", out_bits=8, progress=False)
    assert {m["out_mode"] for m in report.modules} == {"affine"}
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg[DOWN] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert cfg["mode"] == "mxfp4" and "model.layers.0.mlp.switch_mlp.gate_proj" not in cfg
    ours, base = weights(out), weights(src)
    a = mx.load(str(built["adapter"] / "adapters.safetensors"))
    # mlx-lm's LoRASwitchLinear arithmetic: scale * lora_b @ lora_a, cast to the dequantized (bf16) dtype
    lb, la = a[f"{DOWN}.lora_b"], a[f"{DOWN}.lora_a"]
    with mx.stream(mx.cpu):
        w = mx.dequantize(base[f"{DOWN}.weight"], base[f"{DOWN}.scales"], None, 32, 4, "mxfp4")
        w = w + (2.0 * lb @ la.reshape(w.shape[0], -1, w.shape[-1])).astype(w.dtype)
        wq, s, b = mx.quantize(w, 64, 8)
    for part, x in (("weight", wq), ("scales", s), ("biases", b)):
        assert mx.array_equal(ours[f"{DOWN}.{part}"], x).item(), part
    model, tok = mlx_lm.load(str(out))
    layer = model.model.layers[0].mlp.switch_mlp
    assert isinstance(layer.down_proj, QuantizedSwitchLinear) and layer.down_proj.mode == "affine"
    assert layer.gate_proj.mode == "mxfp4"
    assert isinstance(mlx_lm.generate(model, tok, "The capital of", max_tokens=4), str)


def test_out_mode_mxfp4_from_affine_drops_biases_and_loads(toy_model_dir, built, tmp_path):
    import mlx_lm

    out = tmp_path / "out"
    fuse_model(toy_model_dir, built["adapter"], out, out_mode="mxfp4", progress=False)
    ours, base = weights(out), weights(toy_model_dir)
    assert f"{DOWN}.biases" not in ours and ours[f"{DOWN}.scales"].dtype == mx.uint8
    assert f"{ROUTER}.biases" in ours  # not adapted: untouched
    with mx.stream(mx.cpu):
        w = mx.dequantize(base[f"{Q}.weight"], base[f"{Q}.scales"], base[f"{Q}.biases"], 64, 3)
        a = mx.load(str(built["adapter"] / "adapters.safetensors"))
        w = w + (2.0 * a[f"{Q}.lora_b"].T @ a[f"{Q}.lora_a"].T).astype(w.dtype)
        wq, s = mx.quantize(w, mode="mxfp4")
    assert mx.array_equal(ours[f"{Q}.weight"], wq).item() and mx.array_equal(ours[f"{Q}.scales"], s).item()
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg[Q] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    model, tok = mlx_lm.load(str(out))
    assert model.model.layers[1].self_attn.q_proj.mode == "mxfp4"
    assert isinstance(mlx_lm.generate(model, tok, "The capital of", max_tokens=4), str)


@pytest.mark.parametrize("mode", FP)
def test_fused_outputs_load_and_generate_in_mlx_lm(built, mode, tmp_path):
    import mlx_lm

    for kw in (dict(requant="keep-grid"), dict(out_mode="mxfp8" if mode != "mxfp8" else "mxfp4")):
        out = tmp_path / "-".join(kw.values())
        fuse_model(built[mode]["model"], built["adapter"], out, progress=False, **kw)
        model, tok = mlx_lm.load(str(out))
        assert isinstance(mlx_lm.generate(model, tok, "The capital of", max_tokens=4), str)


def test_bad_input_is_one_line(built, tmp_path):
    src = built["nvfp4"]["model"]
    with pytest.raises(ReqnoiseError, match="cannot re-quantize a nvfp4 module into nvfp4: output: bits"):
        fuse_model(src, built["adapter"], tmp_path / "a", out_bits=8, progress=False)
    with pytest.raises(ReqnoiseError, match="--out-mode re-quantizes from scratch"):
        fuse_model(src, built["adapter"], tmp_path / "b", requant="keep-grid", out_mode="affine", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["mode"] = "affine"  # nvfp4 tensors under an affine config
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReqnoiseError, match="says mode 'affine' but it has U8 scales and no biases") as err:
        fuse_model(bad, built["adapter"], tmp_path / "c", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def _np_codes(words: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[:-1] + (-1,))


@pytest.mark.parametrize("mode", ("mxfp4", "mxfp8"))
def test_noise_zero_control_counts_codes_and_scales(built, mode):
    src = built[mode]["model"]
    rep = noise_report(src, built["adapter"], control="zero", outputs=False, progress=False)
    row = next(r for r in rep["modules"] if r["module"] == DOWN and r["expert"] == 3)
    base = weights(src)
    with mx.stream(mx.cpu):
        w = mx.dequantize(base[f"{DOWN}.weight"], base[f"{DOWN}.scales"], None, 32, BITS[mode], mode)
        wq, s = mx.quantize(w, 32, BITS[mode], mode=mode)
    c0 = _np_codes(np.array(base[f"{DOWN}.weight"][3]), BITS[mode])
    c1 = _np_codes(np.array(wq[3]), BITS[mode])
    assert row["code_change_frac"] == pytest.approx(np.mean(c0 != c1), abs=1e-7)
    assert row["scale_change_frac"] == pytest.approx(np.mean(np.array(base[f"{DOWN}.scales"][3]) != np.array(s[3])))
    assert row["delta_cosine"] is None and row["delta_rms_over_step"] == 0.0


def test_fp_local_step_is_the_code_spacing_times_the_scale():
    # one group whose codes are every E2M1 magnitude, scale 2^0 (mxfp4) / 1.0 (nvfp4): hand-computed spacing
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    spacing = [0.5, 0.5, 0.5, 0.5, 1, 1, 2, 2]
    for mode, g in (("mxfp4", 32), ("nvfp4", 16)):
        row = np.array((mags + [-m for m in mags]) * (g // 16) * 2, dtype=np.float32)[None]
        wq, s = mx.quantize(mx.array(row), g, 4, mode=mode)
        step = fp_local_step({"weight": wq, "scales": s}, (4, g), mode)
        np.testing.assert_array_equal(step[0, :8], spacing)
        np.testing.assert_array_equal(step[0, 8:16], spacing)
    # E4M3 at a 2^0 scale: 448 -> 32, 1 -> 1/8, 0.5 -> 1/16, the subnormals 2^-9 apart
    vals = np.array([448, 1, 0.5, 2**-9, 3 * 2**-9, 0] + [0] * 26, dtype=np.float32)
    wq, s = mx.quantize(mx.array(vals[None]), 32, 8, mode="mxfp8")
    step = fp_local_step({"weight": wq, "scales": s}, (8, 32), "mxfp8")
    np.testing.assert_array_equal(step[0, :6], [32, 2**-3, 2**-4, 2**-9, 2**-9, 2**-9])


def test_noise_report_with_outputs_on_mxfp4(built):
    rep = noise_report(built["mxfp4"]["model"], built["adapter"], prompts=["Who are you?", "Name a color."])
    s, o = rep["summary"], rep["outputs"]
    assert s["adapted_entries"] == s["entries"] > 0 and s["median_delta_rms_over_step"] > 0
    assert 0 < s["median_delta_cosine"] <= 1 + 1e-5
    assert o["prompts"] == 2 and o["kl_adapter_fused"] >= 0 and np.isfinite(o["kl_adapter_base"])


@pytest.fixture(scope="module")
def gauss(toy_model_dir_fp, tmp_path_factory):
    """An adapter of Gaussian factors (std 0.02): deltas no format represents exactly."""
    return make_adapter(toy_model_dir_fp, tmp_path_factory.mktemp("gauss") / "lora", dyadic=False, seed=1)


@pytest.mark.parametrize("mode", FP)
def test_fresh_with_gaussian_deltas_matches_mlx_lm_fuse(built, gauss, mode, tmp_path):
    # Measured: 0 differing words and scales in every mode (the kernel computes in bfloat16 as mlx-lm does);
    # the test holds that, so any mismatch shows up.
    theirs = _mlx_lm_fuse(built[mode]["model"], gauss, tmp_path / "theirs")
    fuse_model(built[mode]["model"], gauss, tmp_path / "ours", progress=False)
    _same_tensors(weights(tmp_path / "ours"), weights(theirs))


def test_cli_fuse_and_noise_on_an_fp_model(built, tmp_path, capsys):
    from reqnoise.cli import main

    src, ad = str(built["nvfp4"]["model"]), str(built["adapter"])
    out = str(tmp_path / "o")
    assert (
        main(["fuse", "--model", src, "--adapter-path", ad, "--save-path", out, "--out-mode", "mxfp8", "--quiet"]) == 0
    )
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization"]
    assert cfg[DOWN] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    js = tmp_path / "n.json"
    assert main(["noise", "--model", src, "--adapter-path", ad, "--no-outputs", "--quiet", "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["options"]["out_mode"] is None and all(r["code_change_frac"] is not None for r in rep["modules"])
    assert "adapter" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ("mxfp4", "nvfp4"))
def test_dora_adapter_fuses_like_mlx_lm(built, toy_model_dir_fp, mode, tmp_path):
    keys = ["self_attn.q_proj", "self_attn.o_proj"]
    ad = make_adapter(toy_model_dir_fp, tmp_path / "dora", keys=keys, dyadic=False, fine_tune_type="dora")
    src = built[mode]["model"]
    fuse_model(src, ad, tmp_path / "ours", progress=False)
    _same_tensors(weights(tmp_path / "ours"), weights(_mlx_lm_fuse(src, ad, tmp_path / "theirs")))
