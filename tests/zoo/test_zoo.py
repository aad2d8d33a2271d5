"""Conformance of reqnoise's fuse against mlx-lm's on a tiny random instance of every MoE model type mlx-lm loads,
in every quantization mode (conftest.MODES): mlx-lm's own fuse, quantize and load are the oracles."""

import json

import mlx.core as mx
import pytest
from families import NEEDS_METAL, PACKS, UNCONFIGURED, switch_model_types

from conftest import ALL_TYPES, MODES, mlx_lm_fuse, mode_param, weights
from fuse_helpers import MEMO
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
    assert set(UNCONFIGURED) <= set(ALL_TYPES) and set(NEEDS_METAL) <= set(ALL_TYPES)


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


# The end-to-end checks load models (mlx-lm's generate, reqnoise's noise and eval): one mode per type keeps the
# zoo's run time down; the fuse itself is checked in every mode above.
E2E_MODE = next(c for c in MODES if c.id == "affine4")


def _e2e_case(model_type):
    """affine4, or the one mode a packed format has."""
    mode = PACKS.get(model_type, {}).get("mode", E2E_MODE.id)
    return next(c for c in MODES if c.id == mode)


ITEMS = [
    {
        "id": f"q{i}",
        "question": q,
        "options": opts,
        "answer": "A",
        "subject": "toy",
    }
    for i, (q, opts) in enumerate(
        [
            ("What colour is the sky?", ["blue", "green", "red", "black"]),
            ("How many legs has a cat?", ["four", "two", "six", "eight"]),
            ("Which is a fruit?", ["apple", "stone", "chair", "cloud"]),
        ]
    )
]


def _records(path):
    # what the model answered, without what names the run (paths, timings)
    drop = ("model", "adapter", "seconds", "time", "path")
    return [
        {k: v for k, v in json.loads(line).items() if not any(d in k for d in drop)}
        for line in path.read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_fused_model_loads_generates_and_evaluates_like_mlx_lms(zoo, model_type, tmp_path, capsys):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    if model_type in NEEDS_METAL and not mx.metal.is_available():
        pytest.skip(f"needs Metal: {NEEDS_METAL[model_type]}")
    case = _e2e_case(model_type)
    model, adapter = zoo.model(model_type, case), zoo.adapter(model_type, case)
    _fuse("--model", model, "--adapter-path", adapter, "--save-path", tmp_path / "ours")
    theirs = mlx_lm_fuse(model, adapter, tmp_path / "theirs")
    m, tok = mlx_lm.load(str(tmp_path / "ours"))
    text = mlx_lm.generate(m, tok, "The sky is", max_tokens=4, sampler=make_sampler(temp=0.0))
    assert isinstance(text, str)

    assert reqnoise_main(
        [
            "noise",
            "--model",
            str(model),
            "--adapter-path",
            str(adapter),
            "--quiet",
            "--json",
            str(tmp_path / "noise.json"),
        ]
    ) in (0, None)
    noise = json.loads((tmp_path / "noise.json").read_text())
    assert noise

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    for name, d in (("ours", tmp_path / "ours"), ("theirs", theirs)):
        rc = reqnoise_main(
            ["eval", "--model", str(d), "--items", str(items), "--out", str(tmp_path / f"{name}.jsonl"), "--quiet"]
        )
        assert rc in (0, None)
    assert _records(tmp_path / "ours.jsonl") == _records(tmp_path / "theirs.jsonl")
    capsys.readouterr()


def _one_line_error(argv, capsys):
    rc = reqnoise_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc not in (0, None) and err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("model_type", [t for t in ("qwen3_moe", "mixtral", "gpt_oss", "qwen3_5_moe", "deepseek_v3")])
def test_adapter_of_another_model_type_is_one_line_error(zoo, model_type, tmp_path, capsys):
    other = "dbrx" if model_type != "dbrx" else "qwen3_moe"
    model, adapter = zoo.model(model_type, E2E_MODE), zoo.adapter(other, E2E_MODE)
    err = _one_line_error(
        ["fuse", "--model", str(model), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "o"), "--quiet"],
        capsys,
    )
    assert "match no tensor" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "qwen3_5_moe"])
def test_mode_mismatch_between_config_and_tensors_is_one_line_error(zoo, model_type, tmp_path, capsys):
    import shutil

    model, adapter = zoo.model(model_type, E2E_MODE), zoo.adapter(model_type, E2E_MODE)
    # config says 3 bits, tensors are 4-bit
    bad = tmp_path / "bits"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _one_line_error(
        ["fuse", "--model", str(bad), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "o1"), "--quiet"],
        capsys,
    )
    assert "mismatch between config and tensors" in err

    # tensors are mxfp4 (no biases), config says affine: without the check they would be fused as float
    import mlx.core as mx

    bad = tmp_path / "mode"
    shutil.copytree(model, bad)
    tensors = weights(bad)
    for k in [k for k in tensors if k.endswith(".biases")]:
        module = k[: -len(".biases")]
        w = mx.dequantize(
            tensors[f"{module}.weight"], tensors[f"{module}.scales"], tensors[k], **_params(cfg, module, 4)
        )
        tensors[f"{module}.weight"], tensors[f"{module}.scales"] = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        del tensors[k]
    for f in bad.glob("model*.safetensors"):
        f.unlink()
    mx.save_safetensors(str(bad / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    err = _one_line_error(
        ["fuse", "--model", str(bad), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "o2"), "--quiet"],
        capsys,
    )
    assert "mismatch between config and tensors" in err


def _params(cfg, module, default_bits):
    q = cfg["quantization"]
    p = q.get(module) if isinstance(q.get(module), dict) else {"group_size": q["group_size"], "bits": default_bits}
    return {"group_size": p["group_size"], "bits": p["bits"]}


# Adapters trained the way users train them (`reqnoise train`, mlx-lm's tuner) on three families and three formats,
# then fused like the synthetic ones: mlx-lm's fuse of the same adapter is the oracle.
TRAINED = [("qwen3_moe", "affine4"), ("gpt_oss", "mxfp4"), ("deepseek_v3", "affine3"), ("mixtral", "nvfp4")]


@pytest.mark.parametrize(
    "model_type, case",
    [pytest.param(t, next(c for c in MODES if c.id == m), id=f"{t}-{m}") for t, m in TRAINED],
)
def test_adapter_trained_by_reqnoise_train_fuses_as_mlx_lm_fuses_it(zoo, model_type, case, tmp_path, capsys):
    model = zoo.model(model_type, case)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MEMO))
    adapter = tmp_path / "trained"
    argv = ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(adapter), "--quiet"]
    rc = reqnoise_main(argv + ["--iters", "4", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--seed", "1"])
    assert rc in (0, None)
    capsys.readouterr()

    # mlx-lm initialises every lora_b to zero: nonzero ones mean the steps moved dense and expert factors
    factors = mx.load(str(adapter / "adapters.safetensors"))
    moved = {k for k, v in factors.items() if k.endswith(".lora_b") and mx.any(v != 0).item()}
    assert any(factors[k].ndim == 3 for k in moved), "no expert stack's lora_b moved"
    assert any(factors[k].ndim == 2 for k in moved), "no dense lora_b moved"

    _fuse("--model", model, "--adapter-path", adapter, "--save-path", tmp_path / "ours")
    theirs = weights(mlx_lm_fuse(model, adapter, tmp_path / "theirs"))
    ours, base = weights(tmp_path / "ours"), weights(model)
    assert set(ours) == set(theirs)
    for k in sorted(theirs):
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    # the trained delta reached the written expert codes (not lost below the quantization step)
    stacks = {k.rsplit(".", 1)[0] + ".weight" for k in moved if factors[k].ndim == 3}
    assert any(not mx.array_equal(ours[k], base[k]).item() for k in stacks)


def test_hadamard_pack_refuses_a_rotated_target_and_outputs_mlx_lm_cannot_load(zoo, tmp_path, capsys):
    from mlx_lm.models import prism_hadamard_qwen35 as prism

    model_type = "prism_hadamard_qwen35"
    case = _e2e_case(model_type)
    model, adapter = zoo.model(model_type, case), zoo.adapter(model_type, case)
    cfg = json.loads((model / "config.json").read_text())
    rotated = [r["path"] for r in cfg["modules"] if r["block"]]
    assert rotated, "the pack has no rotated module"

    # a delta on a rotated weight (W R^T) would act on rotated inputs: hand-made, as mlx-lm cannot train one
    name = f"language_model.{rotated[0]}"
    rows, words = weights(model)[f"{name}.weight"].shape
    ad = tmp_path / "rot"
    ad.mkdir()
    mx.save_safetensors(
        str(ad / "adapters.safetensors"),
        {f"{name}.lora_a": mx.ones((words * 32 // 2, 4)) / 64, f"{name}.lora_b": mx.ones((4, rows)) / 64},
    )
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"scale": 1.0}}))
    argv = ["fuse", "--model", str(model), "--save-path", str(tmp_path / "o1"), "--quiet"]
    err = _one_line_error(argv + ["--adapter-path", str(ad)], capsys)
    assert "Hadamard-rotated" in err and name in err
    assert not (tmp_path / "o1").exists()

    # the pack's ModelArgs accepts its one quantization block only: dequantized or per-module widths do not load
    no_q = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
    per_module = dict(cfg, quantization=dict(cfg["quantization"], **{name: {"bits": 8, "group_size": 64}}))
    for bad in (no_q, per_module):
        with pytest.raises(ValueError, match="2-bit affine"):
            prism.ModelArgs.from_dict(bad)
    for extra in (["--requant", "dequantize"], ["--out-bits", "8"]):
        err = _one_line_error(
            ["fuse", "--model", str(model), "--adapter-path", str(adapter), "--save-path", str(tmp_path / "o2")]
            + extra,
            capsys,
        )
        assert "Hadamard pack" in err
        assert not (tmp_path / "o2").exists()
