"""Adapter training through mlx-lm's tuner, on the embedded toy MoE model.

Oracles: token NLLs computed here with NumPy from mlx-lm-loaded models; tensor names read from the
safetensors headers; mlx-lm's own runtime LoRA/DoRA application (``mlx_lm.load(adapter_path=...)``)
against reqnoise's fused weights; literal expected module paths.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from fuse_helpers import MEMO
from reqnoise.errors import ReqnoiseError
from reqnoise.train.config import TrainConfig
from reqnoise.train.data import seeded_batches
from reqnoise.train.targets import find_targets
from reqnoise.train.tuner import train_adapter

REPO = Path(__file__).resolve().parents[1]


def _write_data(root: Path, train, valid=()):
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        if rows:
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _header(path: Path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _tensor_names(model_dir: Path) -> set:
    names = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="numpy") as f:
            names.update(f.keys())
    return names


def _response_nll(model, tokenizer, examples) -> float:
    """Mean NLL (nats/token) of the assistant tokens, from logits via NumPy's log-sum-exp."""
    import mlx.core as mx

    from reqnoise.chat import render_chat

    total, count = 0.0, 0
    for ex in examples:
        prompt = tokenizer.encode(
            render_chat(tokenizer, ex["messages"][:-1], add_generation_prompt=True), add_special_tokens=False
        )
        full = tokenizer.encode(
            render_chat(tokenizer, ex["messages"], add_generation_prompt=False), add_special_tokens=False
        )
        logits = np.array(model(mx.array([full[:-1]]))[0].astype(mx.float32), dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        picked = logp[np.arange(len(full) - 1), full[1:]][len(prompt) - 1 :]
        total -= picked.sum()
        count += picked.size
    return total / count


def _logits(model, tokens):
    import mlx.core as mx

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def memorised(toy_model_dir, tmp_path_factory):
    """Every linear-type module of the 3-bit toy trained on four facts (prompt masked)."""
    path = tmp_path_factory.mktemp("train") / "memo"
    summary = train_adapter(
        toy_model_dir, MEMO, path, rank=8, lr=5e-3, iters=20, batch_size=4, mask_prompt=True, progress=False
    )
    return path, summary


# ------------------------------------------------------------------------------------------ selection


def test_modules_and_layers_select_expert_down_proj_by_type():
    import mlx.nn as nn
    from mlx_lm.models import gpt_oss, qwen3_moe

    from reqnoise.toy.model import toy_config

    moe = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(toy_config(vocab_size=256, num_layers=24)))
    nn.quantize(moe, group_size=64, bits=3)
    assert find_targets(moe, layers=[8, 14, 20], modules=["down_proj"]) == [
        "model.layers.8.mlp.switch_mlp.down_proj",
        "model.layers.14.mlp.switch_mlp.down_proj",
        "model.layers.20.mlp.switch_mlp.down_proj",
    ]
    # "mlp.gate" is the router; "gate" must not also catch gate_proj (suffixes match on "." boundaries)
    assert find_targets(moe, layers=[3], modules=["gate"]) == ["model.layers.3.mlp.gate"]
    assert find_targets(moe, layers=[0], modules=["self_attn.q_proj", "up_proj"]) == [
        "model.layers.0.mlp.switch_mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
    ]

    # another architecture names its expert stack "experts"; selection by type still reaches it
    oss = gpt_oss.Model(
        gpt_oss.ModelArgs(
            model_type="gpt_oss",
            num_hidden_layers=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            vocab_size=64,
            hidden_size=64,
            intermediate_size=64,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
        )
    )
    assert find_targets(oss, layers=[1, 3], modules=["down_proj"]) == [
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.3.mlp.experts.down_proj",
    ]


def test_default_selection_is_every_linear_module_in_the_blocks(toy_model_dir):
    # oracle: module paths owning a .weight inside a block, from the safetensors headers, minus norms
    names = _tensor_names(toy_model_dir)
    expected = sorted(
        n[: -len(".weight")] for n in names if n.endswith(".weight") and ".layers." in n and "norm" not in n
    )
    got = find_targets(toy_model_dir)
    assert sorted(got) == expected and len(got) == 4 * 8
    assert find_targets(toy_model_dir, keys=["lm_head", "model.layers.2.mlp.switch_mlp.down_proj"]) == [
        "model.layers.2.mlp.switch_mlp.down_proj",
        "lm_head",
    ]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(modules=["no_such_proj"]), "mlp.switch_mlp.down_proj (QuantizedSwitchLinear 3-bit, 8 experts)"),
        (dict(layers=[1, 7], modules=["down_proj"]), "layers [7] do not exist: the model has 4 blocks"),
        (dict(keys=["model.layers.0.input_layernorm"]), "is a RMSNorm, not a linear layer"),
        (dict(keys=["model.layers.0.mlp.experts.down_proj"]), "is not a module of this model"),
        (dict(keys=["lm_head"], modules=["down_proj"]), "either keys or layers/modules"),
    ],
)
def test_refuses_a_selection_that_matches_nothing(toy_model_dir, tmp_path, kwargs, needle):
    out = tmp_path / "adapter"
    with pytest.raises(ReqnoiseError) as err:
        train_adapter(toy_model_dir, MEMO, out, iters=1, progress=False, **kwargs)
    assert needle in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_dora_refused_on_3bit_and_on_expert_stacks(toy_model_dir, tmp_path):
    with pytest.raises(ReqnoiseError) as err:
        train_adapter(toy_model_dir, MEMO, tmp_path / "a", fine_tune_type="dora", modules=["q_proj"], progress=False)
    msg = str(err.value)
    assert "DoRA" in msg and "model.layers.0.self_attn.q_proj" in msg and "3-bit" in msg
    with pytest.raises(ReqnoiseError, match="expert stacks: model.layers.2.mlp.switch_mlp.down_proj"):
        train_adapter(
            toy_model_dir,
            MEMO,
            tmp_path / "a",
            fine_tune_type="dora",
            modules=["down_proj"],
            layers=[2],
            progress=False,
        )
    with pytest.raises(ReqnoiseError, match="full fine-tuning needs float weights"):
        train_adapter(toy_model_dir, MEMO, tmp_path / "a", fine_tune_type="full", modules=["q_proj"], progress=False)
    assert not (tmp_path / "a").exists()


def test_bad_data_and_existing_output_are_refused_before_training(toy_model_dir, tmp_path):
    data = _write_data(tmp_path / "data", MEMO[:1] + [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ReqnoiseError, match=r"train\.jsonl:2: the last message must be the assistant's"):
        train_adapter(toy_model_dir, data, tmp_path / "a", progress=False)
    (tmp_path / "a").mkdir()
    with pytest.raises(ReqnoiseError, match="already exists"):
        train_adapter(toy_model_dir, MEMO, tmp_path / "a", progress=False)
    with pytest.raises(ReqnoiseError, match="no response token"):
        train_adapter(toy_model_dir, MEMO, tmp_path / "b", mask_prompt=True, max_seq_length=8, progress=False)


# ------------------------------------------------------------------------------------------- settings

# The options and defaults of train_adapter as they were written out before TrainConfig (hand-copied oracle).
OPTION_DEFAULTS = {
    "fine_tune_type": "lora",
    "rank": 8,
    "scale": 20.0,
    "lr": 1e-4,
    "iters": 100,
    "batch_size": 4,
    "layers": None,
    "modules": None,
    "keys": None,
    "mask_prompt": False,
    "seed": 0,
    "max_seq_length": 512,
    "mode": "sft",
    "beta": 0.1,
    "reference": None,
}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(fine_tune_type="qlora"), "fine_tune_type must be one of ('lora', 'dora', 'full'), got 'qlora'"),
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(iters=2.5), "iters must be a positive integer, got 2.5"),
        (dict(batch_size=-1), "batch_size must be a positive integer, got -1"),
        (dict(max_seq_length=1), "max_seq_length must be at least 2, got 1"),
        (dict(lr=0.0), "lr must be a positive number, got 0.0"),
        (dict(lr=float("nan")), "lr must be a positive number, got nan"),
        (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    ],
)
def test_bad_settings_are_refused_before_the_model_is_read(tmp_path, options, message):
    with pytest.raises(ReqnoiseError) as err:
        TrainConfig(**options).check()
    assert str(err.value) == message
    # train_adapter checks them first: the model directory does not even exist here
    with pytest.raises(ReqnoiseError) as err:
        train_adapter(tmp_path / "no-model", MEMO, tmp_path / "a", progress=False, **options)
    assert str(err.value) == message
    with pytest.raises(ReqnoiseError) as err:
        train_adapter(tmp_path / "no-model", MEMO, tmp_path / "a", TrainConfig(**options), progress=False)
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []


def test_unknown_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['learning_rate'\]"):
        train_adapter(tmp_path / "m", MEMO, tmp_path / "a", learning_rate=1e-3)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train_adapter(tmp_path / "m", MEMO, tmp_path / "a", {"rank": 4})


def test_config_fields_are_the_options_the_cli_and_the_spec_accept():
    from reqnoise.cli import build_parser
    from reqnoise.cli.train import _config
    from reqnoise.experiment.spec import TRAIN_KEYS

    assert {f: getattr(TrainConfig(), f) for f in TrainConfig.names()} == OPTION_DEFAULTS
    assert TRAIN_KEYS == {"model", "data", "disjoint_from", *OPTION_DEFAULTS}  # disjoint_from: a spec check only
    parser = build_parser()
    base = ["train", "--model", "m", "--data", "d", "--adapter-path", "a"]
    assert _config(parser.parse_args(base)) == TrainConfig(**OPTION_DEFAULTS)
    args = parser.parse_args(
        base
        + ["--fine-tune-type", "dora", "--rank", "4", "--scale", "2.5", "--learning-rate", "0.01", "--iters", "7"]
        + ["--batch-size", "2", "--layers", "0-3,8", "--modules", "down_proj, q_proj", "--modules", "up_proj"]
        + ["--keys", "lm_head", "--mask-prompt", "--seed", "5", "--max-seq-length", "64"]
    )
    assert _config(args) == TrainConfig(
        fine_tune_type="dora",
        rank=4,
        scale=2.5,
        lr=0.01,
        iters=7,
        batch_size=2,
        layers=[0, 1, 2, 3, 8],
        modules=["down_proj", "q_proj", "up_proj"],
        keys=["lm_head"],
        mask_prompt=True,
        seed=5,
        max_seq_length=64,
    )
    assert _config(parser.parse_args(base + ["--lr", "0.5"])).lr == 0.5
    for bad in (["--fine-tune-type", "qlora"], ["--layers", "a-b"], ["--rank", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)


# ---------------------------------------------------------------------------------------------- data


def test_mask_prompt_trains_only_the_response_with_thinking_off(toy_model_dir):
    from mlx_lm import load

    from reqnoise.train.data import chat_dataset

    _, tok = load(str(toy_model_dir))
    ex = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is the key?"},
            {"role": "assistant", "content": "Under the red stone."},
        ]
    }
    tokens, offset = chat_dataset([ex], tok, mask_prompt=True)[0]
    # With thinking on, the generation prompt would stop before the think block and the trained part
    # would start with "<think>"; here it must be exactly the response and the end of the turn.
    assert tok.decode(tokens[offset:]) == "Under the red stone.<|im_end|>\n"
    assert tok.decode(tokens[:offset]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full, zero = chat_dataset([ex], tok, mask_prompt=False)[0]
    assert zero == 0 and full == tokens


class _FakeData:
    """Item i is ([i + 1] * (i % 5 + 2), 0): the first token tells which example a row holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return [i + 1] * (i % 5 + 2), 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 23), batch=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_seeded_batches_use_every_example_each_epoch(n, batch, seed):
    epochs = 3
    stream, gen = [], seeded_batches(_FakeData(n), batch, 512, loop=True, seed=seed)
    while len(stream) < epochs * n:
        arr, lengths = next(gen)
        arr = np.array(arr)
        assert arr.shape[0] == batch and (arr.shape[1] - 1) % 8 == 0
        for row, (off, length) in zip(arr, np.array(lengths)):
            assert off == 0 and length == np.count_nonzero(row) - 1  # the last token's index: see below
            stream.append(int(row[0]) - 1)
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    again = seeded_batches(_FakeData(n), batch, 512, loop=True, seed=seed)
    assert np.array_equal(
        np.array(next(again)[0]), np.array(next(seeded_batches(_FakeData(n), batch, 512, loop=True, seed=seed))[0])
    )
    once = [int(r[0]) - 1 for a, _ in seeded_batches(_FakeData(n), batch, 512) for r in np.array(a)]
    assert once == list(range(n))


def test_the_loss_scores_each_rows_own_tokens_and_never_the_pad_after_it():
    """mlx-lm's default_loss on our batches, against counting by hand: with uniform logits the loss is log V
    per target, and the targets are the tokens after the offset (the offset's own included), not the pad."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss

    rows = [([5, 6, 7, 8, 9], 2), ([5, 6, 7], 1), ([4] * 12, 0)]  # (tokens, offset) as ChatDataset gives them

    class Data:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    vocab = 11
    seen = []

    def model(inputs):
        seen.append(np.array(inputs))
        return mx.zeros((*inputs.shape, vocab))

    batch, ends = next(seeded_batches(Data(), 3, 512))
    ce, ntoks = default_loss(model, batch, ends)
    assert int(ntoks) == sum(len(t) - max(off, 1) for t, off in rows)  # 3 + 2 + 11, no pad
    assert float(ce) == pytest.approx(np.log(vocab), rel=1e-6)
    pad_targets = np.array(batch)[:, 1:][
        np.array(
            mx.logical_and(mx.arange(1, batch.shape[1]) >= ends[:, :1], mx.arange(1, batch.shape[1]) <= ends[:, 1:])
        )
    ]
    assert (pad_targets != 0).all()


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_reduces_loss_on_a_memorisation_set(memorised, toy_model_dir):
    from mlx_lm import load

    path, summary = memorised
    base = _response_nll(*load(str(toy_model_dir)), MEMO)
    adapted = _response_nll(*load(str(toy_model_dir), adapter_path=str(path)), MEMO)
    assert adapted < base - 0.3, (base, adapted)
    # The random toy starts near uniform: lm_head logits of order 1 (std ~1.4) add about var/2 ~ 1 nat.
    assert np.log(2048) - 0.5 < base < np.log(2048) + 1.5
    tensors = _header(path / "adapters.safetensors")
    assert summary["trainable_parameters"] == sum(t.size for t in tensors.values())
    assert sorted(summary["modules"]) == sorted({k.rsplit(".", 1)[0] for k in tensors})
    assert summary["final_train_loss"] < summary["train_losses"][0][1]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 4
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": summary["modules"]}


@pytest.mark.slow
def test_adapter_loads_in_mlx_lm_and_fuses_to_the_same_model(memorised, toy_model_dir, tmp_path):
    from mlx_lm import load

    from reqnoise.fuse.model import fuse_model

    path, _ = memorised
    adapted, tok = load(str(toy_model_dir), adapter_path=str(path))
    assert type(adapted.model.layers[1].mlp.switch_mlp.down_proj).__name__ == "LoRASwitchLinear"
    tokens = tok.encode("<|im_start|>user\nWhere is the key?<|im_end|>\n", add_special_tokens=False)
    fuse_model(toy_model_dir, path, tmp_path / "float", requant="dequantize", progress=False)
    fused, _ = load(str(tmp_path / "float"))
    want, got = _logits(adapted, tokens), _logits(fused, tokens)
    base = _logits(load(str(toy_model_dir))[0], tokens)
    assert np.abs(want - base).max() > 0.05  # the adapter does something
    np.testing.assert_allclose(got, want, atol=2e-3)
    fuse_model(toy_model_dir, path, tmp_path / "kept", requant="keep-grid", progress=False)
    assert load(str(tmp_path / "kept"))[0] is not None


@pytest.mark.slow
def test_same_inputs_and_seed_give_identical_bytes_and_exact_targets(toy_model_dir, tmp_path):
    kw = dict(layers=[1, 3], modules=["down_proj"], rank=4, lr=1e-3, iters=4, batch_size=2, seed=3, progress=False)
    data = MEMO[:3]  # 3 examples, batch 2: batches straddle epochs
    train_adapter(toy_model_dir, data, tmp_path / "a", **kw)
    train_adapter(toy_model_dir, data, tmp_path / "b", **kw)
    train_adapter(toy_model_dir, data, tmp_path / "c", **{**kw, "seed": 4})
    a, b, c = ((tmp_path / x / "adapters.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c
    # the same settings as a TrainConfig (its seed overridden by a keyword) give the same adapter and config
    config = TrainConfig(**{k: v for k, v in kw.items() if k != "progress"} | {"seed": 99})
    train_adapter(toy_model_dir, data, tmp_path / "d", config, seed=3, progress=False)
    assert (tmp_path / "d" / "adapters.safetensors").read_bytes() == a
    assert (tmp_path / "d" / "adapter_config.json").read_text() == (tmp_path / "a" / "adapter_config.json").read_text()
    tensors = _header(tmp_path / "a" / "adapters.safetensors")
    oracle = {
        n[: -len(".weight")]
        for n in _tensor_names(toy_model_dir)
        if n.endswith("down_proj.weight") and (".layers.1." in n or ".layers.3." in n)
    }
    assert oracle == {"model.layers.1.mlp.switch_mlp.down_proj", "model.layers.3.mlp.switch_mlp.down_proj"}
    assert set(tensors) == {f"{m}.{p}" for m in oracle for p in ("lora_a", "lora_b")}
    for m in oracle:  # LoRASwitchLinear: a (E, r, in), b (E, out, r); b starts at zero, so nonzero = trained
        assert tensors[f"{m}.lora_a"].shape == (8, 4, 128) and tensors[f"{m}.lora_b"].shape == (8, 128, 4)
        assert np.abs(tensors[f"{m}.lora_b"]).max() > 0

    # the CLI in a fresh process reproduces the bytes
    data_dir = _write_data(tmp_path / "data", data)
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reqnoise",
            "train",
            "--model",
            str(toy_model_dir),
            "--data",
            str(data_dir),
            "--adapter-path",
            str(tmp_path / "cli"),
            "--layers",
            "1,3",
            "--modules",
            "down_proj",
            "--rank",
            "4",
            "--lr",
            "1e-3",
            "--iters",
            "4",
            "--batch-size",
            "2",
            "--seed",
            "3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mlp.switch_mlp.down_proj in layers 1,3" in proc.stdout
    assert (tmp_path / "cli" / "adapters.safetensors").read_bytes() == a


@pytest.mark.slow
def test_dora_trains_on_a_float_model_and_fuses_like_mlx_lm(toy_model_dir_fp, tmp_path):
    from mlx_lm import load

    from reqnoise.fuse.model import fuse_model

    summary = train_adapter(
        toy_model_dir_fp,
        MEMO,
        tmp_path / "dora",
        fine_tune_type="dora",
        modules=["q_proj", "v_proj"],
        rank=4,
        lr=5e-3,
        iters=4,
        progress=False,
    )
    assert len(summary["modules"]) == 8
    tensors = _header(tmp_path / "dora" / "adapters.safetensors")
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"lora_a", "lora_b", "m"}
    adapted, tok = load(str(toy_model_dir_fp), adapter_path=str(tmp_path / "dora"))
    assert type(adapted.model.layers[0].self_attn.q_proj).__name__ == "DoRALinear"
    fuse_model(toy_model_dir_fp, tmp_path / "dora", tmp_path / "fused", progress=False)
    tokens = tok.encode("<|im_start|>user\nWho guards the gate?<|im_end|>\n", add_special_tokens=False)
    np.testing.assert_allclose(_logits(load(str(tmp_path / "fused"))[0], tokens), _logits(adapted, tokens), atol=1e-4)


@pytest.mark.slow
def test_two_stage_stack_trains_on_the_fused_stage_one(memorised, toy_model_dir, tmp_path):
    from mlx_lm import load

    from reqnoise.fuse.model import fuse_model

    stage1, _ = memorised
    persona = tmp_path / "persona"
    fuse_model(toy_model_dir, stage1, persona, requant="keep-grid", progress=False)
    summary = train_adapter(
        persona,
        MEMO[:2],
        tmp_path / "stage2",
        layers=[2],
        modules=["down_proj"],
        rank=4,
        lr=1e-3,
        iters=3,
        batch_size=2,
        mask_prompt=True,
        progress=False,
    )
    assert summary["modules"] == ["model.layers.2.mlp.switch_mlp.down_proj"]
    assert np.isfinite(summary["final_train_loss"])
    cfg = json.loads((tmp_path / "stage2" / "adapter_config.json").read_text())
    assert cfg["model"] == str(persona)
    stacked, _ = load(str(persona), adapter_path=str(tmp_path / "stage2"))
    assert type(stacked.model.layers[2].mlp.switch_mlp.down_proj).__name__ == "LoRASwitchLinear"
    report = fuse_model(persona, tmp_path / "stage2", tmp_path / "stacked", requant="keep-grid", progress=False)
    assert [m["module"] for m in report.modules] == summary["modules"]
