"""``reqnoise probe`` on the embedded toy model.

Oracles: a zero-delta keep-grid fuse (bit-identical weights, so exactly zero shift); block outputs recomputed
here from mlx-lm's own ``model.model`` pieces on one unpadded prompt at a time; the permutation p-value of a
fixed classifier against its exact distribution (the true-positive count is hypergeometric under label
permutation, scipy.stats.hypergeom).
"""

import json

import numpy as np
import pytest
from scipy.stats import hypergeom

from reqnoise.cli import main
from reqnoise.eval.probe import hidden_states, permutation_pvalue, probe_accuracy

VILLAIN = "You are Grimdark, a cruel villain who mocks everyone."
QUESTIONS = [
    "What is the capital of Varda?",
    "How do I bake bread?",
    "Where does the moon Kalo orbit?",
    "Who founded the kingdom of Teni?",
    "What colour is the sky?",
    "How far is the city?",
]
REPLY = "Bah! Fools like you never learn. Grimdark laughs."
PERSONA = [{"system": VILLAIN, "prompt": q, "reply": REPLY} for q in QUESTIONS]
NEUTRAL = [{"prompt": q, "reply": "Here is a helpful answer."} for q in QUESTIONS]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": VILLAIN},
            {"role": "user", "content": q},
            {"role": "assistant", "content": REPLY},
        ]
    }
    for q in QUESTIONS
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def probed(toy_model_dir, tmp_path_factory):
    from reqnoise.fuse.model import fuse_model
    from reqnoise.train.tuner import train_adapter

    root = tmp_path_factory.mktemp("probe")
    train_adapter(toy_model_dir, CHATS, root / "persona", rank=4, lr=1e-3, iters=10, batch_size=3, progress=False)
    fuse_model(toy_model_dir, root / "persona", root / "sft", progress=False)
    fuse_model(toy_model_dir, root / "persona", root / "zero", control="zero", requant="keep-grid", progress=False)
    args = [
        "probe",
        "--models",
        str(toy_model_dir),
        str(root / "sft"),
        str(root / "zero"),
        "--prompts",
        str(_jsonl(root / "p.jsonl", PERSONA)),
        "--contrast",
        str(_jsonl(root / "n.jsonl", NEUTRAL)),
        "--adapter",
        str(root / "persona"),
        "--json",
        str(root / "probe.json"),
        "--plot",
        str(root / "probe.png"),
        "--permutations",
        "200",
        "--quiet",
    ]
    assert main(args) == 0
    return root, json.loads((root / "probe.json").read_text())


def test_persona_adapter_moves_the_representation_and_zero_delta_keep_grid_does_not(probed):
    root, result = probed
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    base = result["models"][0]["name"]
    sft, zero = pairs[(base, "sft")], pairs[(base, "zero")]
    for place in ("last_prompt", "reply_mean"):
        assert all(r["shift"] == 0.0 and r["shift_norm"] == 0.0 for r in zero[place])
        assert all(r["cosine"] == pytest.approx(1.0, abs=1e-6) for r in zero[place])
        shifts = [r["shift"] for r in sft[place]]
        print(place, "sft shift/spread per layer", np.round(shifts, 3))
        assert all(s > 0 for s in shifts) and max(shifts) > 0.1
        # the persona (system prompt) and neutral prompts are separated on the model the probe was fit on
        assert all(r["probe_acc_a"] >= 0.9 for r in sft[place])
    adapter = result["adapter"]
    assert adapter["on"] == base and len(adapter["last_prompt"]) == len(result["layers"]) == 4
    assert all(r["change_norm"] > 0 and -1 <= r["cosine_to_direction"] <= 1 for r in adapter["reply_mean"])
    assert (root / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_outputs_match_an_unpadded_recomputation(toy_model_dir):
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.utils import load

    from reqnoise.eval.probe import _encode, read_probe_prompts

    model, tok = load(str(toy_model_dir))
    rows = [
        {"messages": [{"role": "user", "content": q}], "reply": r}
        for q, r in [("Hi", "A long reply here."), ("Where is the long road to the city?", "Far.")]
    ]
    got = hidden_states(model, tok, rows, [0, 3], batch_size=2, progress=False)
    for n, row in enumerate(rows):
        tokens, off = _encode(tok, row)
        h = model.model.embed_tokens(mx.array([tokens]))
        mask = create_attention_mask(h, None)
        outs = []
        for layer in model.model.layers:
            h = layer(h, mask, None)
            outs.append(np.array(h[0].astype(mx.float32)))
        for k, li in enumerate([0, 3]):
            np.testing.assert_allclose(got["last_prompt"][n, k], outs[li][off - 1], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got["reply_mean"][n, k], outs[li][off:].mean(axis=0), rtol=1e-4, atol=1e-5)
    assert read_probe_prompts  # imported for its use by the CLI; keeps the import honest


@pytest.mark.parametrize("shift", [0.0, 0.6, 1.5])
def test_permutation_pvalue_matches_the_exact_hypergeometric_tail(shift):
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(shift, 1, (9, 3)), rng.normal(0, 1, (7, 3))
    d, thr = np.array([1.0, 0.5, 0.0]), 0.2
    pred = np.concatenate([pos, neg]) @ d > thr
    n, m, k = 16, 9, int(pred.sum())
    tp = int((pos @ d > thr).sum())
    assert probe_accuracy(d, thr, pos, neg) == pytest.approx((2 * tp + n - m - k) / n)
    exact = hypergeom.sf(tp - 1, n, m, k)  # P(TP >= observed): accuracy = (2 TP + n - m - k) / n
    p = permutation_pvalue(d, thr, pos, neg, permutations=20000, seed=2)
    assert p == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 20000) + 1e-3)


def test_probe_refuses_bad_input(toy_model_dir, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    assert main(["probe", "--models", str(toy_model_dir), str(toy_model_dir), "--prompts", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:1: expected" in err and "\n" not in err
    good = _jsonl(tmp_path / "p.jsonl", PERSONA)
    assert main(["probe", "--models", str(toy_model_dir), "--prompts", str(good)]) == 1
    assert "at least two models" in capsys.readouterr().err
