"""``reqnoise floor`` on the embedded model, against a zero-delta ``reqnoise fuse`` evaluated by hand."""

import json

import mlx.core as mx
import numpy as np
import pytest

from fuse_helpers import make_adapter, weights
from reqnoise.cli import main
from reqnoise.eval.calibration import calibrate_records
from reqnoise.eval.multiple_choice import evaluate_items

ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    from reqnoise.toy.world import build_world

    return build_world(tmp_path_factory.mktemp("world") / "w", per_subject=8) / "items.jsonl"


@pytest.fixture(scope="module")
def attention_adapter(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("ad") / "attn", keys=ATTENTION)


@pytest.fixture(scope="module")
def floor_run(toy_model_dir, items, attention_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("floor")
    code = main(
        [
            "floor",
            "--quiet",
            "--model",
            str(toy_model_dir),
            "--items",
            str(items),
            "--targets",
            "attention",
            str(attention_adapter),
            "experts.down_proj@1-3",
            "--calibrate",
            "own",
            "--json",
            str(out / "floor.json"),
            "--plot",
            str(out / "floor.png"),
        ]
    )
    assert code == 0
    return json.loads((out / "floor.json").read_text()), out


def _codes(wq: np.ndarray, bits: int) -> np.ndarray:
    """Unpack little-endian ``bits``-bit codes from uint32 words with numpy alone."""
    rows = np.ascontiguousarray(wq).reshape(-1, wq.shape[-1]).view(np.uint8)
    b = np.unpackbits(rows, axis=-1, bitorder="little").reshape(-1, bits)
    return b @ (1 << np.arange(bits))


def test_keep_grid_rows_are_exactly_zero(floor_run):
    rep, out = floor_run
    keep = [r for r in rep["rows"] if r["requant"] == "keep-grid"]
    assert len(keep) == 3
    for r in keep:
        assert (r["changed"], r["fixed"], r["broken"], r["difference"]) == (0, 0, 0, 0)
        assert r["setg_gain"] == 0 and r["codes_changed"] == 0 and r["kl"] == 0
    assert (out / "floor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fresh_rows_equal_a_fuse_evaluated_by_hand(floor_run, toy_model_dir, items, attention_adapter, tmp_path):
    rep, _ = floor_run
    fused = tmp_path / "fused"
    args = ["fuse", "--quiet", "--model", str(toy_model_dir), "--adapter-path", str(attention_adapter)]
    assert main([*args, "--save-path", str(fused), "--control", "zero"]) == 0
    base, _ = evaluate_items(toy_model_dir, items, progress=False)
    ours, _ = evaluate_items(fused, items, progress=False)
    base, ours = calibrate_records(base), calibrate_records(ours)
    changed = sum(a["prediction"] != b["prediction"] for a, b in zip(base, ours))
    fixed = sum(not a["correct"] and b["correct"] for a, b in zip(base, ours))
    broken = sum(a["correct"] and not b["correct"] for a, b in zip(base, ours))
    wrong = sum(not a["correct"] for a in base)
    w0, w1 = weights(toy_model_dir), weights(fused)
    names = [k for k in w0 if "self_attn" in k and k.endswith(".weight") and k[: -len("weight")] + "scales" in w0]
    diff = sum(int((_codes(np.array(w0[k]), 3) != _codes(np.array(w1[k]), 3)).sum()) for k in names)
    total = sum(_codes(np.array(w0[k]), 3).size for k in names)
    assert diff > 0  # fresh requantization of the toy's attention is not a fixed point
    rows = [r for r in rep["rows"] if r["requant"] == "fresh" and r["group"] in ("attention", str(attention_adapter))]
    assert len(rows) == 2
    for r in rows:
        assert r["modules"] == 16
        assert (r["changed"], r["fixed"], r["broken"], r["wrong_n"]) == (changed, fixed, broken, wrong)
        assert r["difference"] == pytest.approx((fixed - broken) / len(base))
        assert r["setg_gain"] == pytest.approx(fixed / wrong)
        assert r["codes_changed"] == pytest.approx(diff / total)
        assert r["kl"] > 0
    assert mx.array_equal(w0["model.layers.0.mlp.gate.weight"], w1["model.layers.0.mlp.gate.weight"]).item()


def test_a_prior_from_other_records_scores_every_copy_as_those_records_would(
    toy_model_dir, items, attention_adapter, tmp_path
):
    """--calibrate shared --prior-from R: the unfused model and every copy are calibrated with the mean option
    log-probability of R (here the model's records of the reworded items), checked against a zero-delta fuse
    evaluated by hand and calibrated in numpy."""
    from reqnoise.eval.records import write_records

    prior_recs, _ = evaluate_items(toy_model_dir, items.parent / "reworded.jsonl", progress=False)
    write_records(tmp_path / "prior.jsonl", prior_recs)
    args = ["--model", toy_model_dir, "--items", items, "--targets", "attention", "--requant", "fresh"]
    assert main(["floor", "--quiet", *map(str, args), "--calibrate", "shared", "--json", str(tmp_path / "f.json")]) == 0
    plain = json.loads((tmp_path / "f.json").read_text())
    shared = [*args, "--calibrate", "shared", "--prior-from", tmp_path / "prior.jsonl", "--json", tmp_path / "g.json"]
    assert main(["floor", "--quiet", *map(str, shared)]) == 0
    rep = json.loads((tmp_path / "g.json").read_text())
    fused = tmp_path / "fused"
    fuse = ["fuse", "--quiet", "--model", str(toy_model_dir), "--adapter-path", str(attention_adapter)]
    assert main([*fuse, "--save-path", str(fused), "--control", "zero"]) == 0
    prior = np.mean([r["option_logprobs"] for r in prior_recs], axis=0)

    def answers(model):
        recs, _ = evaluate_items(model, items, progress=False)
        return [("ABCD"[int(np.argmax(np.asarray(r["option_logprobs"]) - prior))], r["answer"]) for r in recs]

    base, ours = answers(toy_model_dir), answers(fused)
    (row,) = rep["rows"]
    assert rep["accuracy"] == pytest.approx(sum(p == a for p, a in base) / len(base))
    assert row["changed"] == sum(b[0] != o[0] for b, o in zip(base, ours))
    assert row["fixed"] == sum(b[0] != b[1] and o[0] == o[1] for b, o in zip(base, ours))
    assert row["broken"] == sum(b[0] == b[1] and o[0] != o[1] for b, o in zip(base, ours))
    assert rep["calibrate"].startswith("shared (prior from ") and plain["calibrate"] == "shared"
    assert (rep["accuracy"], row["changed"]) != (plain["accuracy"], plain["rows"][0]["changed"])


def test_prior_from_needs_shared_calibration_and_an_existing_file(toy_model_dir, items, tmp_path, capsys):
    code, err = _error(capsys, "--model", toy_model_dir, "--items", items, "--prior-from", tmp_path / "none.jsonl")
    assert code != 0 and "prior records file" in err and len(err.splitlines()) == 1
    (tmp_path / "r.jsonl").write_text("")
    code, err = _error(capsys, "--model", toy_model_dir, "--items", items, "--prior-from", tmp_path / "r.jsonl")
    assert code != 0 and "needs calibrate = 'shared'" in err and len(err.splitlines()) == 1


def _error(capsys, *args):
    code = main(["floor", "--quiet", *map(str, args)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "targets, match",
    [
        (["mlp"], "unknown group 'mlp'"),
        (["attention@9"], "layers [9] do not exist"),
        (["experts.q_proj"], "matches no quantized module"),
    ],
)
def test_bad_groups_are_one_line_errors(toy_model_dir, items, capsys, targets, match):
    code, err = _error(capsys, "--model", toy_model_dir, "--items", items, "--targets", *targets)
    assert code != 0 and match in err and len(err.splitlines()) == 1 and err.startswith("reqnoise floor: error:")


def test_missing_items_file_is_a_one_line_error(toy_model_dir, tmp_path, capsys):
    code, err = _error(capsys, "--model", toy_model_dir, "--items", tmp_path / "nope.jsonl")
    assert code != 0 and "items file" in err and "does not exist" in err and len(err.splitlines()) == 1


def test_keep_grid_swaps_leave_every_tensor_as_it_was_and_fresh_swaps_do_not(toy_model_dir):
    """What lets a keep-grid row skip the scoring: its zero-delta swap is the loaded tensors bit for bit
    (checked against the loaded module's own arrays); a fresh swap moves codes and is scored."""
    from reqnoise.eval.multiple_choice import load_model
    from reqnoise.fuse.options import FuseOptions
    from reqnoise.noise.floor import _same_state, zero_delta

    net, _ = load_model(toy_model_dir)
    mod = dict(net.named_modules())["model.layers.0.self_attn.q_proj"]
    keep = zero_delta(mod, FuseOptions(requant="keep-grid", control="zero"))
    fresh = zero_delta(mod, FuseOptions(requant="fresh", control="zero"))
    current = {k: getattr(mod, k) for k in keep}
    assert _same_state(current, keep)
    assert not _same_state(current, fresh)
