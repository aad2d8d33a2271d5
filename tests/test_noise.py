"""Requantization-noise analytics on the embedded model, checked against independent computations."""

import json

import mlx.core as mx
import numpy as np
import pytest

from fuse_helpers import dequantized, make_adapter
from reqnoise.cli import main
from reqnoise.fuse.adapters import load_adapter
from reqnoise.noise.report import noise_report, verdict

DOWN = "model.layers.1.mlp.switch_mlp.down_proj"


@pytest.fixture(scope="module")
def large(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("ad") / "large", dyadic=False, size=0.2, seed=1)


@pytest.fixture(scope="module")
def small(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("ad") / "small", dyadic=False, size=0.02, seed=2)


def test_large_adapter_survives_fresh(toy_model_dir, large):
    rep = noise_report(toy_model_dir, large, outputs=False, progress=False)
    cos = [r["delta_cosine"] for r in rep["modules"]]
    assert min(cos) > 0.95 and rep["summary"]["median_delta_rms_over_step"] > 2
    assert rep["verdict"].startswith("adapter survives")


def test_small_adapter_is_erased_at_3_bits_and_kept_at_8(toy_model_dir, small):
    rep = noise_report(toy_model_dir, small, outputs=False, progress=False)
    assert rep["summary"]["median_delta_cosine"] < 0.5
    assert rep["summary"]["median_delta_rms_over_step"] < 0.5
    assert rep["verdict"].startswith("adapter mostly erased")
    assert rep["alternatives"]["--out-bits 8"] > 0.9 and "--out-bits 8 gives median cosine" in rep["verdict"]
    rep8 = noise_report(toy_model_dir, small, out_bits=8, outputs=False, progress=False)
    assert rep8["summary"]["median_delta_cosine"] > 0.9
    # keep-grid removes the artifact, but a delta under half a step cannot move a code on the same grid:
    # whatever moves, moves along the delta.
    kg = noise_report(toy_model_dir, small, requant="keep-grid", outputs=False, progress=False)
    moved = [r for r in kg["modules"] if r["eff_norm"] > 0]
    assert kg["summary"]["mean_code_change_frac"] < rep["summary"]["mean_code_change_frac"]
    assert all(r["delta_cosine"] > 0 for r in moved)
    assert rep["alternatives"]["--requant keep-grid"] == pytest.approx(kg["summary"]["median_delta_cosine"])


def test_metrics_match_an_independent_numpy_computation(toy_model_dir, small, tmp_path):
    from reqnoise.fuse.model import fuse_model

    rep = noise_report(toy_model_dir, small, outputs=False, progress=False, alternatives=False)
    fuse_model(toy_model_dir, small, tmp_path / "fused", progress=False)
    m = load_adapter(small).modules[DOWN]
    intended = np.array(m.scale * m.b @ m.a).astype(np.float64)
    eff = (dequantized(tmp_path / "fused", DOWN) - dequantized(toy_model_dir, DOWN)).astype(np.float64)
    rows = {r["expert"]: r for r in rep["modules"] if r["module"] == DOWN}
    for e in range(intended.shape[0]):
        d, f = intended[e], eff[e]
        cos = (d * f).sum() / np.linalg.norm(d) / np.linalg.norm(f)
        assert rows[e]["delta_cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-5)
        assert rows[e]["delta_rel_error"] == pytest.approx(np.linalg.norm(f - d) / np.linalg.norm(d), rel=1e-4)
        assert rows[e]["noise_frac"] == pytest.approx(1 - cos**2, abs=1e-4)


def test_zero_control_shows_the_artifact_and_keep_grid_removes_it(toy_model_dir, small):
    fresh = noise_report(toy_model_dir, small, control="zero", outputs=False, progress=False)
    keep = noise_report(toy_model_dir, small, control="zero", requant="keep-grid", outputs=False, progress=False)
    assert all(
        r["code_change_frac"] == 0 and r["scale_change_frac"] == 0 and r["eff_norm"] == 0 for r in keep["modules"]
    )
    assert "no code changed" in keep["verdict"]
    assert all(r["delta_cosine"] is None for r in fresh["modules"])
    # The artifact, measured independently with MLX's own ops.
    from fuse_helpers import weights

    w = weights(toy_model_dir)
    wq = w[f"{DOWN}.weight"]
    rq = mx.quantize(
        mx.dequantize(wq, w[f"{DOWN}.scales"], w[f"{DOWN}.biases"], group_size=64, bits=3), group_size=64, bits=3
    )[0]
    from reqnoise.kernel.reference import unpack_codes

    want = (unpack_codes(np.array(wq), 3) != unpack_codes(np.array(rq), 3)).mean(axis=(-1, -2))
    got = [r["code_change_frac"] for r in fresh["modules"] if r["module"] == DOWN]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert min(got) > 0.01 and "requantization alone changed" in fresh["verdict"]


@pytest.mark.slow
def test_output_metrics(toy_model_dir, large, small):
    deq = noise_report(toy_model_dir, large, requant="dequantize", progress=False, alternatives=False)
    assert deq["outputs"]["kl_adapter_fused"] < 1e-6
    assert deq["outputs"]["top1_fused_vs_adapter"] == 1.0
    rep = noise_report(toy_model_dir, small, progress=False, alternatives=False)
    o = rep["outputs"]
    assert set(o) >= {"kl_adapter_fused", "kl_adapter_base", "top1_fused_vs_adapter", "top1_fused_vs_base"}
    assert ("closer to the base" in rep["verdict"]) == (o["kl_adapter_fused"] > o["kl_adapter_base"])


def test_cli_writes_json_and_plot(toy_model_dir, small, tmp_path, capsys):
    code = main(
        [
            "noise",
            "--quiet",
            "--model",
            str(toy_model_dir),
            "--adapter-path",
            str(small),
            "--no-outputs",
            "--json",
            str(tmp_path / "n.json"),
            "--plot",
            str(tmp_path / "n.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "mostly erased" in out
    rep = json.loads((tmp_path / "n.json").read_text())
    assert set(rep) >= {"modules", "summary", "outputs", "verdict"}
    assert set(rep["modules"][0]) >= {
        "module",
        "layer",
        "expert",
        "code_change_frac",
        "scale_change_frac",
        "delta_cosine",
        "delta_rel_error",
        "delta_rms_over_step",
        "noise_frac",
    }
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(
        [
            "noise",
            "--quiet",
            "--model",
            str(toy_model_dir),
            "--adapter-path",
            str(small),
            "--no-outputs",
            "--json",
            str(tmp_path / "n.json"),
        ]
    )
    assert code != 0 and "already exists" in capsys.readouterr().err


def _summary(med, steps=0.12):
    return {"median_delta_cosine": med, "median_delta_rms_over_step": steps, "mean_code_change_frac": 0.1}


def test_verdict_offers_only_alternatives_that_improve_the_median_cosine():
    # The demo's case: fresh keeps median cosine 0.03, keep-grid 0.00 (worse), --out-bits 8 0.81 (better).
    line = verdict(
        _summary(0.03),
        None,
        requant="fresh",
        out_bits=None,
        control="none",
        alternatives={"--requant keep-grid": 0.0, "--out-bits 8": 0.81},
    )
    assert line.startswith("adapter mostly erased by requantization (median cosine 0.03)")
    assert "--out-bits 8 gives median cosine 0.81" in line
    assert "keep-grid gives" not in line
    assert "--requant keep-grid does not keep more of it (median cosine 0.00 vs 0.03)" in line
    assert "cannot keep a delta smaller than half a step (this adapter's median RMS delta: 0.12 steps)" in line


def test_verdict_an_equal_alternative_is_not_offered_and_a_close_better_one_prints_distinct():
    same = verdict(
        _summary(0.4), None, requant="fresh", out_bits=None, control="none", alternatives={"--out-bits 8": 0.4}
    )
    assert "gives" not in same and "does not keep more of it (median cosine 0.40 vs 0.40)" in same
    # 0.401 beats 0.4: printed with enough decimals that the offer does not read as equal.
    close = verdict(
        _summary(0.4), None, requant="fresh", out_bits=None, control="none", alternatives={"--out-bits 8": 0.401}
    )
    assert "--out-bits 8 gives median cosine 0.401" in close


def test_verdict_keep_grid_carries_its_limit_when_it_does_improve():
    line = verdict(
        _summary(0.2, steps=0.7),
        None,
        requant="fresh",
        out_bits=None,
        control="none",
        alternatives={"--requant keep-grid": 0.6, "--out-bits 8": None},
    )
    assert "--requant keep-grid gives median cosine 0.60: keep-grid removes the zero-delta artifact" in line
    assert "--out-bits 8" not in line
