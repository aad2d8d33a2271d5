"""Conformance of reqnoise's fuse against mlx-lm's on a tiny random instance of every MoE model type mlx-lm loads,
in every quantization mode (conftest.MODES): mlx-lm's own fuse, quantize and load are the oracles."""

import json

import mlx.core as mx
import pytest
from families import UNCONFIGURED, switch_model_types

from conftest import ALL_TYPES, MODES, mlx_lm_fuse, mode_param, weights
from reqnoise.cli import main as reqnoise_main

TYPES = [
    pytest.param(t, id=t, marks=[pytest.mark.skip(reason=f"no tiny configuration yet: {UNCONFIGURED[t]}")])
    if t in UNCONFIGURED
    else t
    for t in ALL_TYPES
]
MODE_PARAMS = [mode_param(c) for c in MODES]


def _fuse(*args):
    rc = reqnoise_main(["fuse", "--quiet", *map(str, args)])
    assert rc in (0, None)


def _quant_block(cfg):
    return cfg.get("quantization") or {}


def test_the_zoo_lists_every_switch_model_type():
    # generated from mlx-lm's sources: a new mlx-lm that adds a type fails here until it is configured or listed
    assert ALL_TYPES[: len(switch_model_types())] == switch_model_types()
    assert set(UNCONFIGURED) <= set(ALL_TYPES)


@pytest.mark.parametrize("case", MODE_PARAMS)
@pytest.mark.parametrize("model_type", TYPES)
def test_fresh_fuse_is_mlx_lm_fuse(zoo, model_type, case, tmp_path):
    model, adapter = zoo.model(model_type, case), zoo.adapter(model_type, case)
    _fuse("--model", model, "--adapter-path", adapter, "--save-path", tmp_path / "ours")
    theirs = weights(mlx_lm_fuse(model, adapter, tmp_path / "theirs"))
    ours = weights(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for k in sorted(theirs):
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    fused = json.loads((tmp_path / "ours" / "fuse_report.json").read_text())["modules"]
    assert fused, "the adapter fused no module"


@pytest.mark.parametrize("case", MODE_PARAMS)
@pytest.mark.parametrize("model_type", TYPES)
def test_zero_control_keep_grid_is_the_input_and_fresh_is_mlx_requantization(zoo, model_type, case, tmp_path):
    model, adapter = zoo.model(model_type, case), zoo.adapter(model_type, case)
    base = weights(model)
    _fuse(
        "--model",
        model,
        "--adapter-path",
        adapter,
        "--save-path",
        tmp_path / "kg",
        "--control",
        "zero",
        "--requant",
        "keep-grid",
    )
    kg = weights(tmp_path / "kg")
    assert set(kg) == set(base)
    for k in base:
        assert kg[k].dtype == base[k].dtype and mx.array_equal(kg[k], base[k]).item(), k

    _fuse("--model", model, "--adapter-path", adapter, "--save-path", tmp_path / "fr", "--control", "zero")
    fresh = weights(tmp_path / "fr")
    q = _quant_block(json.loads((model / "config.json").read_text()))
    for entry in json.loads((tmp_path / "fr" / "fuse_report.json").read_text())["modules"]:
        m = entry["module"]
        if f"{m}.scales" not in base:  # a float module: a zero delta leaves it as it was
            assert mx.array_equal(fresh[f"{m}.weight"], base[f"{m}.weight"]).item(), m
            continue
        qp = q.get(m) if isinstance(q.get(m), dict) else q
        kw = dict(group_size=qp["group_size"], bits=qp["bits"], mode=qp.get("mode", "affine"))
        w = mx.dequantize(base[f"{m}.weight"], base[f"{m}.scales"], base.get(f"{m}.biases"), **kw)
        want = mx.quantize(w, **kw)
        for got, expected in zip((fresh[f"{m}.weight"], fresh[f"{m}.scales"], fresh.get(f"{m}.biases")), want):
            assert mx.array_equal(got, expected).item(), m
