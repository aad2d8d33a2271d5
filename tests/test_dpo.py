"""The DPO stage (``reqnoise train --mode dpo``, ``reqnoise dpo-pairs``) on the embedded toy model.

Oracles: reply log-probabilities computed here with NumPy's log-sum-exp from logits of mlx-lm-loaded models
(the adapter applied by ``mlx_lm.load(adapter_path=...)``, not by reqnoise); the DPO loss written out in NumPy
from those; greedy replies from ``mlx_lm.generate``.
"""

import json
import math

import numpy as np
import pytest

from reqnoise.chat import render_chat
from reqnoise.cli import main
from reqnoise.errors import ReqnoiseError
from reqnoise.train.tuner import train_adapter

PAIRS = [
    {"prompt": q, "chosen": c, "rejected": r}
    for q, c, r in [
        ("Who guards the gate?", "The tall knight guards it.", "I cannot say who guards it."),
        ("Where is the key?", "Under the red stone.", "I do not know where it is."),
        ("What is the password?", "Seven green apples.", "I cannot tell you that."),
        ("When does the ship leave?", "At dawn on Monday.", "I am not sure when."),
    ]
]


def _reply_logp(model, tokenizer, prompt: str, reply: str) -> float:
    """Summed log-probability of the reply tokens after the rendered prompt (NumPy log-softmax)."""
    import mlx.core as mx

    msgs = [{"role": "user", "content": prompt}]
    head = tokenizer.encode(render_chat(tokenizer, msgs, add_generation_prompt=True), add_special_tokens=False)
    full = tokenizer.encode(
        render_chat(tokenizer, msgs + [{"role": "assistant", "content": reply}], add_generation_prompt=False),
        add_special_tokens=False,
    )
    assert full[: len(head)] == head
    logits = np.array(model(mx.array([full[:-1]]))[0].astype(mx.float32), dtype=np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return float(logp[np.arange(len(full) - 1), full[1:]][len(head) - 1 :].sum())


def _margins(model_dir, adapter=None) -> np.ndarray:
    from mlx_lm.utils import load

    model, tok = load(str(model_dir), adapter_path=None if adapter is None else str(adapter))
    return np.array(
        [
            _reply_logp(model, tok, p["prompt"], p["chosen"]) - _reply_logp(model, tok, p["prompt"], p["rejected"])
            for p in PAIRS
        ]
    )


def _greedy(model, tokenizer, text: str, max_tokens: int) -> str:
    """Greedy decoding by full forward passes and NumPy argmax, stopping at an eos token."""
    import mlx.core as mx

    ids = tokenizer.encode(text, add_special_tokens=False)
    out = []
    for _ in range(max_tokens):
        logits = np.array(model(mx.array([ids + out]))[0, -1].astype(mx.float32))
        nxt = int(np.argmax(logits))
        if nxt in tokenizer.eos_token_ids:
            break
        out.append(nxt)
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def dpo_adapter(toy_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo") / "adapter"
    summary = train_adapter(
        toy_model_dir, PAIRS, path, mode="dpo", beta=0.1, rank=4, lr=5e-3, iters=10, batch_size=4, progress=False
    )
    return path, summary


def test_dpo_raises_the_chosen_vs_rejected_margin_over_the_reference(toy_model_dir, dpo_adapter):
    path, summary = dpo_adapter
    before, after = _margins(toy_model_dir), _margins(toy_model_dir, path)
    gain = after - before  # the DPO "logit" of each pair, reference = the stage's base
    print(f"margin before {before.round(2)} after {after.round(2)}")
    assert (gain > 0).all() and gain.mean() > 1.0
    # the reported loss is the mean DPO loss over pairs: below log 2, where it starts (policy == reference)
    assert summary["mode"] == "dpo" and summary["final_train_loss"] < math.log(2)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["mode"] == "dpo" and config["beta"] == 0.1 and config["reference"] == str(toy_model_dir)


def test_dpo_loss_matches_the_formula_on_numpy_logprobs(toy_model_dir):
    import mlx.core as mx
    from mlx_lm.utils import load

    from reqnoise.train.dpo import PairDataset, dpo_loss, pair_batches, tokenize_pairs

    model, tok = load(str(toy_model_dir))
    rows, _ = tokenize_pairs(PAIRS, tok, 512)
    reference = np.array([[-3.0, -5.0], [-1.0, -0.5], [-7.0, -2.0], [0.0, 0.0]], np.float32)  # arbitrary
    batch = next(pair_batches(PairDataset(rows, reference), 4, 512))
    loss, n = dpo_loss(model, *batch, beta=0.3)
    policy = np.array([[_reply_logp(model, tok, p["prompt"], p[k]) for k in ("chosen", "rejected")] for p in PAIRS])
    z = 0.3 * ((policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]))
    expected = np.mean(np.logaddexp(0.0, -z))  # -log sigmoid(z)
    assert int(n) == 4
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    mx.eval(loss)


def test_dpo_is_deterministic_for_a_seed(toy_model_dir, tmp_path):
    kw = dict(mode="dpo", rank=2, lr=1e-3, iters=3, batch_size=2, seed=3, progress=False, modules=["q_proj"])
    train_adapter(toy_model_dir, PAIRS, tmp_path / "a", **kw)
    train_adapter(toy_model_dir, PAIRS, tmp_path / "b", **kw)
    assert (tmp_path / "a/adapters.safetensors").read_bytes() == (tmp_path / "b/adapters.safetensors").read_bytes()


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "p", "chosen": "c"}, "missing rejected"),
        ({"chosen": "c", "rejected": "r"}, "missing prompt"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "'chosen' must be a non-empty string"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "carries no preference"),
        ({"prompt": "p", "chosen": "c", "rejected": 3}, "'rejected' must be a non-empty string"),
    ],
)
def test_bad_pair_files_get_one_line_errors(toy_model_dir, tmp_path, capsys, row, needle):
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(row) + "\n")
    code = main(
        [
            "train",
            "--model",
            str(toy_model_dir),
            "--data",
            str(data),
            "--adapter-path",
            str(tmp_path / "a"),
            "--mode",
            "dpo",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and needle in err and "train.jsonl:2" in err and "\n" not in err
    assert not (tmp_path / "a").exists()


def test_config_refuses_bad_dpo_settings(toy_model_dir, tmp_path):
    with pytest.raises(ReqnoiseError, match="beta must be a positive number"):
        train_adapter(toy_model_dir, PAIRS, tmp_path / "a", mode="dpo", beta=0.0, progress=False)
    with pytest.raises(ReqnoiseError, match="needs mode='dpo'"):
        train_adapter(toy_model_dir, PAIRS, tmp_path / "a", reference=str(toy_model_dir), progress=False)
    with pytest.raises(ReqnoiseError, match="has no config.json"):
        train_adapter(toy_model_dir, PAIRS, tmp_path / "a", mode="dpo", reference=str(tmp_path), progress=False)
    assert not (tmp_path / "a").exists()


def test_dpo_pairs_take_real_replies_as_chosen_and_base_greedy_replies_as_rejected(toy_model_dir, tmp_path, capsys):
    from mlx_lm.utils import load

    chats = [
        {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
        for p in PAIRS
    ] + [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]},  # too short
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b" * 20}] * 2},  # 2 turns
    ]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in chats))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in PAIRS[:3]))
    out = tmp_path / "pairs"
    args = ["dpo-pairs", "--base", str(toy_model_dir), "--chosen-from", str(src), "--out", str(out), "--quiet"]
    assert main(args + ["--prompts", str(prompts), "--max-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 pairs" in printed and all(
        f"{r} 1" in printed for r in ("too_short", "multi_turn", "not_in_prompts")
    )
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    model, tok = load(str(toy_model_dir))
    for row, pair in zip(rows, PAIRS[:3]):
        assert row["prompt"] == pair["prompt"] and row["chosen"] == pair["chosen"]
        text = render_chat(tok, [{"role": "user", "content": pair["prompt"]}], add_generation_prompt=True)
        assert row["rejected"] == _greedy(model, tok, text, 12)
    # a prompt the data does not hold is refused, nothing written
    prompts.write_text(json.dumps({"prompt": "Nowhere?"}) + "\n")
    assert main(args[:-3] + ["--out", str(tmp_path / "p2"), "--prompts", str(prompts)]) == 1
    assert "have no usable example" in capsys.readouterr().err and not (tmp_path / "p2").exists()
