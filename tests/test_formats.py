"""One home per constant: formats.py agrees with the native kernel and with MLX; FuseOptions drives the CLI,
the spec and the runner's step parameters; the light modules stay mlx-free."""

import argparse
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from reqnoise import _core, fuse_quantized
from reqnoise.errors import ReqnoiseError
from reqnoise.experiment.spec import FUSE_KEYS
from reqnoise.fuse.options import CONTROLS, FuseOptions, add_arguments
from reqnoise.kernel import formats


def test_native_kernel_accepts_exactly_the_python_widths():
    assert tuple(_core.supported_bits()) == formats.SUPPORTED_BITS
    assert tuple(_core.supported_group_sizes()) == formats.SUPPORTED_GROUP_SIZES
    assert formats.SUPPORTED_MODES == ("affine", "mxfp4", "nvfp4", "mxfp8")


@pytest.mark.parametrize("bits", formats.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", formats.SUPPORTED_GROUP_SIZES)
def test_every_listed_width_is_one_mlx_quantizes_and_the_kernel_fuses(bits, group_size):
    # The oracle is MLX itself: every listed (bits, group) must be a format mx.quantize produces, and the
    # kernel's zero-delta keep-grid fuse of it must return MLX's codes unchanged.
    w = mx.array(np.random.default_rng(bits * group_size).standard_normal((8, 256)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits, mode="affine")
    assert formats.logical_in_dim(wq.shape[-1], bits) == 256
    out, _, _ = fuse_quantized(wq, s, b, group_size=group_size, bits=bits, requant="keep-grid")
    assert np.array_equal(np.array(out), np.array(wq))


def test_check_width_refuses_what_is_not_listed():
    with pytest.raises(ValueError, match="bits must be one of"):
        formats.check_width(7, 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        formats.check_width(4, 16)
    with pytest.raises(ValueError, match="mode must be one of"):
        formats.check_width(4, 32, mode="mxfp6")
    with pytest.raises(ValueError, match="group_size must be one of"):
        formats.check_width(4, 32, mode="nvfp4")
    with pytest.raises(ValueError, match="requant must be one of"):
        w = mx.zeros((4, 64))
        fuse_quantized(*mx.quantize(w, group_size=64, bits=4), group_size=64, bits=4, requant="dequantize")


def test_requant_names_are_distinct_and_nested():
    assert formats.KERNEL_REQUANTS == ("fresh", "keep-grid", "calibrated")
    assert formats.REQUANT_MODES == ("fresh", "keep-grid", "calibrated", "dequantize")
    assert CONTROLS == ("none", "zero", "random")


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_options_are_generated_from_the_fields():
    defaults = _parse([])
    assert vars(defaults) == {
        "requant": "fresh",
        "out_bits": None,
        "control": "none",
        "seed": 0,
        "layers": None,
        "calib_data": None,
        "calib_tokens": None,
        "out_mode": None,
    }
    args = _parse(["--requant", "keep-grid", "--control", "random", "--seed", "3", "--layers", "9,2,2"])
    assert FuseOptions.from_table(vars(args)) == FuseOptions("keep-grid", None, "random", 3, [2, 9])
    assert _parse(["--out-bits", "8"]).out_bits == 8
    for bad in (["--out-bits", "7"], ["--requant", "nope"], ["--control", "nope"]):
        with pytest.raises(SystemExit):
            _parse(bad)


def test_spec_keys_and_runner_params_follow_the_fields():
    assert FUSE_KEYS == {
        "from",
        "adapter",
        "requant",
        "out_bits",
        "control",
        "seed",
        "layers",
        "calib_data",
        "calib_tokens",
        "out_mode",
    }
    table = {"from": "base", "adapter": "a", "control": "zero", "seed": 2}
    # only what the table sets, as the runner's step parameters always were (a default stays implicit)
    assert FuseOptions.table_subset(table) == {"control": "zero", "seed": 2}


def test_check_and_merge():
    assert FuseOptions().check() == FuseOptions()
    for bad, msg in (
        (FuseOptions(requant="x"), "requant must be one of"),
        (FuseOptions(control="x"), "control must be one of"),
        (FuseOptions(requant="keep-grid", out_bits=8), "needs --requant fresh"),
        (FuseOptions(out_bits=7), "bits must be one of"),
        (FuseOptions(layers=["a"]), "layers must be"),
    ):
        with pytest.raises(ReqnoiseError, match=msg):
            bad.check()
    opts = FuseOptions(control="zero")
    assert FuseOptions.merge(opts, {}, "f") is opts
    assert FuseOptions.merge(None, {"control": "zero"}, "f") == opts
    with pytest.raises(ReqnoiseError, match="not both"):
        FuseOptions.merge(opts, {"requant": "keep-grid"}, "f")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bits'"):
        FuseOptions.merge(None, {"bits": 4}, "f")


def test_output_quant():
    assert FuseOptions().output_quant((4, 64)) == (4, 64)
    assert FuseOptions(out_bits=8).output_quant((4, 32)) == (8, 32)
    assert FuseOptions(requant="keep-grid").output_quant((3, 64)) == (3, 64)
    assert FuseOptions(requant="dequantize").output_quant((4, 64)) is None
    assert FuseOptions().output_quant(None) is None


def test_light_modules_do_not_import_mlx():
    code = (
        "import sys, argparse; import reqnoise.kernel.formats, reqnoise.fuse.options, reqnoise.experiment.spec\n"
        "from reqnoise.cli import fuse, noise\n"
        "sub = argparse.ArgumentParser().add_subparsers(); fuse.register(sub); noise.register(sub)\n"
        "print('mlx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
