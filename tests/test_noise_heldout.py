"""The noise report's output-space measures on held-out prompts (residual over effect, output cosine, KL ratio)
and ``--requant calibrated`` in ``reqnoise noise``, against computations by hand with MLX and mlx-lm's own
model components."""

import contextlib
import io
import json

import mlx.core as mx
import numpy as np
import pytest

from fuse_helpers import dequantized, make_adapter
from reqnoise.cli import main
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.calibration import BUILTIN_PROMPTS, MIN_EXPERT_TOKENS
from reqnoise.fuse.options import FuseOptions
from reqnoise.noise.heldout import DEFAULT_HELDOUT_TOKENS, PROBE_PROMPTS, heldout_set, overlaps
from reqnoise.noise.report import noise_report

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.switch_mlp.up_proj"
TEXTS = [
    "the river runs to the sea and the sea is wide",
    "a cat sat on the mat and looked at the door",
    "seven and five are twelve, and twelve is a dozen",
]
PROMPTS = ["Name a colour.", "What is two plus two?"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def adapter(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("ho") / "ad", dyadic=False, size=0.05, seed=3)


@pytest.fixture(scope="module")
def cal_run(toy_model_dir, adapter, tmp_path_factory):
    """``reqnoise noise --requant calibrated`` on three held-out texts: (its JSON, its stdout)."""
    tmp = tmp_path_factory.mktemp("cal")
    held = _jsonl(tmp / "held.jsonl", [{"text": t} for t in TEXTS])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["noise", "--quiet", "--model", str(toy_model_dir), "--adapter-path", str(adapter), "--requant",
             "calibrated", "--heldout-data", str(held), "--json", str(tmp / "n.json")]
        )  # fmt: skip
    assert code == 0
    return json.loads((tmp / "n.json").read_text()), out.getvalue()


def _hand_inputs(model_dir, adapter_path):
    """Per held-out text: the input of layer 0's q_proj and of its expert stack (with each token's experts),
    from mlx-lm's own layers of the adapter model, not from the report's recording."""
    import mlx_lm
    from mlx_lm.models.base import create_attention_mask

    model, tok = mlx_lm.load(str(model_dir), adapter_path=str(adapter_path))
    layer = model.model.layers[0]
    q_in, up_in, routes = [], [], []
    for text in TEXTS:
        h = model.model.embed_tokens(mx.array(tok.encode(text))[None])
        x = layer.input_layernorm(h)
        h2 = h + layer.self_attn(x, create_attention_mask(h, None), None)
        x2 = layer.post_attention_layernorm(h2)
        gates = mx.softmax(layer.mlp.gate(x2), axis=-1, precise=True)
        k = layer.mlp.top_k
        inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
        q_in.append(np.array(x[0]))
        up_in.append(np.array(x2[0]))
        routes.append(np.array(inds[0]))
    return np.concatenate(q_in), np.concatenate(up_in), np.concatenate(routes)


def _adapter_delta(adapter_path, module):
    """scale * B A from the adapter file (mlx-lm's orientation: lora_a (.., in, r), lora_b (.., r, out))."""
    w = mx.load(str(adapter_path / "adapters.safetensors"))
    scale = json.loads((adapter_path / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    a, b = np.array(w[f"{module}.lora_a"]), np.array(w[f"{module}.lora_b"])
    return scale * np.swapaxes(a @ b, -1, -2) if a.ndim == 2 else scale * b @ a


def _ratios(eff, delta, x):
    """(||(eff - delta) X^T|| / ||delta X^T||, cos(eff X^T, delta X^T)) with MLX ops."""
    xt = mx.array(x).T
    fo, do = mx.array(eff) @ xt, mx.array(delta) @ xt
    res = (mx.linalg.norm(fo - do) / mx.linalg.norm(do)).item()
    cos = (mx.sum(fo * do) / (mx.linalg.norm(fo) * mx.linalg.norm(do))).item()
    return res, cos


def test_residual_over_effect_matches_a_hand_computation(toy_model_dir, adapter, cal_run, tmp_path):
    from reqnoise.fuse.model import fuse_model

    rep, _ = cal_run
    fuse_model(toy_model_dir, adapter, tmp_path / "f", requant="calibrated", progress=False)
    q_x, up_x, routes = _hand_inputs(toy_model_dir, adapter)
    pooled = {m["module"]: m for m in rep["heldout_modules"]}
    rows = {(r["module"], r["expert"]): r for r in rep["modules"]}

    eff = dequantized(tmp_path / "f", Q) - dequantized(toy_model_dir, Q)
    res, cos = _ratios(eff, _adapter_delta(adapter, Q), q_x)
    assert pooled[Q]["residual_over_effect"] == pytest.approx(res, rel=1e-4)
    assert pooled[Q]["output_cosine"] == pytest.approx(cos, rel=1e-4)
    assert rows[(Q, None)]["heldout_rows"] == len(q_x) == rep["heldout"]["tokens"]
    assert 0.05 < res < 1  # neither trivially kept nor lost: the comparison can fail

    # The expert stack: per expert on the tokens routed to it, pooled over the stack's (token, expert) rows.
    eff = dequantized(tmp_path / "f", UP) - dequantized(toy_model_dir, UP)
    delta = _adapter_delta(adapter, UP)
    num = den = 0.0
    for e in range(eff.shape[0]):
        x = up_x[(routes == e).any(axis=-1)]
        assert rows[(UP, e)]["heldout_rows"] == len(x)
        if len(x) == 0:
            assert rows[(UP, e)]["residual_over_effect"] is None
            continue
        res, _ = _ratios(eff[e], delta[e], x)
        assert rows[(UP, e)]["residual_over_effect"] == pytest.approx(res, rel=1e-4)
        do = delta[e].astype(np.float64) @ x.T.astype(np.float64)
        num += np.sum((eff[e].astype(np.float64) @ x.T.astype(np.float64) - do) ** 2)
        den += np.sum(do**2)
    assert pooled[UP]["residual_over_effect"] == pytest.approx(np.sqrt(num / den), rel=1e-4)


def test_cli_calibrated_reports_calibration_heldout_and_outputs(cal_run):
    rep, out = cal_run
    starved = [r for r in rep["modules"] if r["calibration_rows"] < MIN_EXPERT_TOKENS]
    assert all(r["calibration_fallback"] == (r in starved) for r in rep["modules"])
    assert rep["calibration"]["source"] == "builtin" and rep["calibration"]["fallback_entries"] == len(starved)
    assert rep["heldout"]["sequences"] == 3 and rep["heldout"]["disjoint_from"]["source"] == "builtin"
    o = rep["outputs"]
    assert o["positions"] == rep["heldout"]["tokens"]
    assert o["kl_ratio"] == pytest.approx(o["kl_adapter_fused"] / o["kl_adapter_base"])
    assert "res/eff" in out and "out-cos" in out and "checked disjoint from builtin" in out
    assert f"ratio {o['kl_ratio']:.3f}" in out


def _kl_by_hand(model_dir, adapter_path, prompts):
    """Mean KL(adapter || base) over every position of the rendered prompts, with MLX ops."""
    import mlx_lm

    from reqnoise.chat import render_chat

    base, tok = mlx_lm.load(str(model_dir))
    ad, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter_path))
    total, n = 0.0, 0
    for p in prompts:
        text = render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)
        ids = mx.array(tok.encode(text, add_special_tokens=False))[None]
        a, b = ad(ids)[0].astype(mx.float32), base(ids)[0].astype(mx.float32)
        la = a - mx.logsumexp(a, axis=-1, keepdims=True)
        lb = b - mx.logsumexp(b, axis=-1, keepdims=True)
        total += mx.sum(mx.exp(la) * (la - lb)).item()
        n += la.shape[0]
    return total / n


def test_zero_delta_keep_grid_is_the_base_model_exactly(toy_model_dir, adapter):
    rep = noise_report(
        toy_model_dir, adapter, requant="keep-grid", control="zero", prompts=PROMPTS, progress=False,
        alternatives=False,
    )  # fmt: skip
    o = rep["outputs"]
    assert o["kl_fused_base"] == 0.0 and o["kl_adapter_fused"] == o["kl_adapter_base"] and o["kl_ratio"] == 1.0
    assert o["top1_fused_vs_base"] == 1.0 and o["logit_change_cosine"] is None
    assert o["kl_adapter_base"] == pytest.approx(_kl_by_hand(toy_model_dir, adapter, PROMPTS), rel=1e-3)
    # no intended delta: the ratios are undefined, not zero
    assert all(m["residual_over_effect"] is None for m in rep["heldout_modules"])


def test_dense_dequantize_fuse_keeps_the_adapter(toy_model_dir, adapter):
    rep = noise_report(toy_model_dir, adapter, requant="dequantize", prompts=PROMPTS, progress=False)
    o = rep["outputs"]
    assert o["kl_ratio"] < 1e-9 and o["logit_change_cosine"] > 1 - 1e-9 and o["top1_fused_vs_adapter"] == 1.0
    assert max(m["residual_over_effect"] for m in rep["heldout_modules"]) < 1e-5
    assert min(m["output_cosine"] for m in rep["heldout_modules"]) > 1 - 1e-6
    assert o["kl_adapter_base"] > 1e-3  # the adapter does change the outputs: the ratio is not 0/0


def test_dora_effect_is_the_renormalised_weight(toy_model_dir_fp, tmp_path):
    # A float model fuses DoRA exactly (mlx-lm's DoRALinear.fuse arithmetic): what the adapter computes is kept,
    # which the measures show only if they compare with the renormalised weight rather than with B A alone.
    keys = ["self_attn.q_proj", "self_attn.v_proj"]
    ad = make_adapter(toy_model_dir_fp, tmp_path / "dora", keys=keys, dyadic=False, size=0.05, fine_tune_type="dora")
    rep = noise_report(toy_model_dir_fp, ad, prompts=PROMPTS, progress=False, alternatives=False)
    assert max(m["residual_over_effect"] for m in rep["heldout_modules"]) < 1e-4
    assert rep["outputs"]["kl_ratio"] < 1e-6


def test_overlaps_by_token_ids():
    cal = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    held = [[1, 2, 3], [5, 6], [5, 6, 7], [7, 9], [9]]
    # a prefix of a calibration sequence, equal, extends one, and two that share no prefix
    assert overlaps(held, cal) == {0: 0, 1: 1, 2: 1}
    assert overlaps([[2, 3]], cal) == {}


def test_heldout_overlapping_calibration_is_refused_before_any_model_runs(
    toy_model_dir, adapter, tmp_path, monkeypatch
):
    import reqnoise.noise.report as report

    monkeypatch.setattr(report, "collect_inputs", lambda *a, **k: pytest.fail("a model ran"))
    cal = _jsonl(
        tmp_path / "cal.jsonl",
        [{"text": "unrelated words"}, {"prompt": "Who are you?", "completion": "A small model."}],
    )
    # the held-out user turn, rendered with the generation prompt, is a prefix of calibration example 2
    held = _jsonl(
        tmp_path / "held.jsonl", [{"text": "a line"}, {"messages": [{"role": "user", "content": "Who are you?"}]}]
    )
    with pytest.raises(ReqnoiseError, match="held-out example 2 of .* overlaps calibration example 2 of") as err:
        noise_report(
            toy_model_dir, adapter, requant="calibrated", calib_data=str(cal), heldout_data=str(held), progress=False
        )
    assert "\n" not in str(err.value)
    with pytest.raises(ReqnoiseError, match="held-out example 1 of prompts overlaps calibration example 1"):
        noise_report(toy_model_dir, adapter, requant="calibrated", prompts=[BUILTIN_PROMPTS[0]], progress=False)


def test_default_heldout_drops_the_probes_in_the_calibration_data(toy_model_dir, adapter, tmp_path):
    cal = _jsonl(tmp_path / "cal.jsonl", [{"messages": [{"role": "user", "content": PROBE_PROMPTS[3]}]}])
    opts = FuseOptions(requant="calibrated", calib_data=str(cal)).check()
    held = heldout_set(toy_model_dir, adapter, opts)
    assert held.dropped == [PROBE_PROMPTS[3]] and len(held.data.sequences) == len(PROBE_PROMPTS) - 1
    assert held.to_dict()["disjoint_from"]["source"] == str(cal)
    # other modes use the same default set: the default calibration data (here the built-in prompts) is
    # disjoint from the probes, so nothing is dropped, and it is said what it was checked against
    fresh = heldout_set(toy_model_dir, adapter, FuseOptions())
    assert fresh.dropped == [] and fresh.to_dict()["disjoint_from"]["source"] == "builtin"
    assert len(fresh.data.sequences) == len(PROBE_PROMPTS)


def test_calibrated_without_outputs_reports_fallback_experts(toy_model_dir, adapter):
    rep = noise_report(
        toy_model_dir, adapter, requant="calibrated", calib_tokens=40, outputs=False, alternatives=False, progress=False
    )
    rows = rep["modules"]
    assert all(r["calibration_fallback"] == (r["calibration_rows"] < MIN_EXPERT_TOKENS) for r in rows)
    assert rep["summary"]["calibration_fallback_entries"] == sum(r["calibration_fallback"] for r in rows)
    assert 0 < rep["summary"]["calibration_fallback_entries"] < len(rows)
    assert rep["outputs"] is None and rep["heldout"] is None and rep["heldout_modules"] == []
    assert all(r["residual_over_effect"] is None for r in rep["modules"])


def test_heldout_tokens_help_names_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["noise", "--help"])
    assert f"default {DEFAULT_HELDOUT_TOKENS}" in " ".join(capsys.readouterr().out.split())
