"""Bad input to `reqnoise fuse`: non-zero exit, one line naming the problem, nothing left at --save-path."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from fuse_helpers import make_adapter, tree_bytes
from reqnoise.cli import main


@pytest.fixture(scope="module")
def adapter(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("ad") / "lora", keys=["mlp.switch_mlp.down_proj"])


def run_cli(capsys, *args):
    code = main(["fuse", "--quiet", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def copy_adapter(adapter, dst, edit=None):
    shutil.copytree(adapter, dst)
    if edit:
        edit(dst)
    return dst


def rewrite_tensors(path, fn):
    t = mx.load(str(path / "adapters.safetensors"))
    mx.save_safetensors(str(path / "adapters.safetensors"), fn(t))


CASES = {
    "keys_match_nothing": (
        lambda d: rewrite_tensors(d, lambda t: {k.replace("down_proj", "dwn_proj"): v for k, v in t.items()}),
        "match no tensor",
    ),
    "shape_mismatch": (
        lambda d: rewrite_tensors(
            d, lambda t: {k: (v[:, :2] if k.endswith("lora_a") and "layers.0." in k else v) for k, v in t.items()}
        ),
        "disagree on the rank|do not fit",
    ),
    "nan": (
        lambda d: rewrite_tensors(
            d, lambda t: {k: (v * float("nan") if "layers.2." in k else v) for k, v in t.items()}
        ),
        "NaN or Inf",
    ),
    "truncated_weights": (
        lambda d: (d / "adapters.safetensors").write_bytes((d / "adapters.safetensors").read_bytes()[:-100]),
        "not a valid safetensors file",
    ),
    "garbage_weights": (
        lambda d: (d / "adapters.safetensors").write_bytes(b"\x10\x00" + b"x" * 50),
        "not a valid safetensors file",
    ),
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json does not exist"),
    "malformed_config": (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    "no_scale": (
        lambda d: (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"})),
        "lora_parameters",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter(case, toy_model_dir, adapter, tmp_path, capsys):
    edit, pattern = CASES[case]
    bad = copy_adapter(adapter, tmp_path / "bad", edit)
    before = tree_bytes(bad)
    code, err = run_cli(capsys, "--model", toy_model_dir, "--adapter-path", bad, "--save-path", tmp_path / "out")
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("reqnoise fuse: error:")
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert tree_bytes(bad) == before  # inputs are never modified


def bad_model(toy_model_dir, dst, edit):
    shutil.copytree(toy_model_dir, dst)
    edit(dst)
    return dst


MODEL_CASES = {
    "missing_config": (lambda d: (d / "config.json").unlink(), "config.json does not exist"),
    "malformed_config": (lambda d: (d / "config.json").write_text("[1, 2"), "not valid JSON"),
    "truncated_shard": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "not a valid safetensors file",
    ),
    "no_shards": (
        lambda d: [(d / "model.safetensors").unlink(), (d / "model.safetensors.index.json").unlink()],
        "no model.*safetensors",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model(case, toy_model_dir, adapter, tmp_path, capsys):
    edit, pattern = MODEL_CASES[case]
    model = bad_model(toy_model_dir, tmp_path / "model", edit)
    code, err = run_cli(capsys, "--model", model, "--adapter-path", adapter, "--save-path", tmp_path / "out")
    import re

    assert code != 0 and re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_save_path_inside_model_or_equal_is_refused(toy_model_dir, adapter, tmp_path, capsys):
    model = bad_model(toy_model_dir, tmp_path / "model", lambda d: None)
    for target in (model, model / "fused", tmp_path):
        code, err = run_cli(capsys, "--model", model, "--adapter-path", adapter, "--save-path", target, "--overwrite")
        assert code != 0 and "save path" in err, err
    assert tree_bytes(model) == tree_bytes(toy_model_dir)


def test_existing_save_path_needs_overwrite(toy_model_dir, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "--model", toy_model_dir, "--adapter-path", adapter, "--save-path", out)
    assert code != 0 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _ = run_cli(capsys, "--model", toy_model_dir, "--adapter-path", adapter, "--save-path", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_bad_options(toy_model_dir, adapter, tmp_path, capsys):
    code, err = run_cli(
        capsys,
        "--model",
        toy_model_dir,
        "--adapter-path",
        adapter,
        "--save-path",
        tmp_path / "o",
        "--requant",
        "keep-grid",
        "--out-bits",
        "8",
    )
    assert code != 0 and "needs --requant fresh" in err
    code, err = run_cli(
        capsys, "--model", toy_model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "o", "--layers", "7,9"
    )
    assert code != 0 and "selects none" in err
    assert not (tmp_path / "o").exists()


_SLOW_WRITER = r"""
import signal, sys, time, pathlib
# Ctrl-C as at a terminal: a runner that starts the suite in the background (nohup cmd &) hands its children
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
import reqnoise.fuse.model as f
orig = f.save_shard
def slow(tensors, path):
    orig(tensors, path)
    pathlib.Path(sys.argv[1]).write_text("written")
    time.sleep(60)
f.save_shard = slow
from reqnoise.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_mid_write_leaves_no_partial_model(sig, toy_model_dir, adapter, tmp_path):
    flag = tmp_path / "flag"
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_WRITER,
            str(flag),
            "fuse",
            "--quiet",
            "--model",
            str(toy_model_dir),
            "--adapter-path",
            str(adapter),
            "--save-path",
            str(out),
        ],
        env=dict(os.environ),
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGINT:  # a clean interrupt also removes the temporary directory
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
