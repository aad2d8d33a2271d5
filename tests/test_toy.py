"""The embedded toy MoE model: determinism, mlx-lm compatibility, quantization layout, tokenizer, CLI."""

import dataclasses
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import reqnoise
from reqnoise.cli import main as cli_main
from reqnoise.errors import ReqnoiseError
from reqnoise.toy.model import ToyShape, build_toy_model, toy_config
from reqnoise.toy.tokenizer import OPTION_LETTERS, train_tokenizer

NUM_LAYERS, NUM_EXPERTS = 4, 8


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _unpack_codes(wq: np.ndarray, bits: int, n_in: int) -> np.ndarray:
    """MLX affine packing read independently: each row is a little-endian LSB-first bitstream of codes."""
    raw = np.ascontiguousarray(wq.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")
    stream = stream.reshape(*wq.shape[:-1], n_in, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(-1)


def _safetensors_dtypes(path: Path) -> set[str]:
    """Tensor dtypes from the safetensors header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


# --- determinism ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(toy_model_dir, tmp_path):
    again = build_toy_model(tmp_path / "again")
    assert _files(again) == _files(toy_model_dir)
    assert set(_files(toy_model_dir)) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

    other = _files(build_toy_model(tmp_path / "seed1", seed=1))
    assert other["model.safetensors"] != _files(toy_model_dir)["model.safetensors"]
    # The tokenizer depends on the corpus only, so models built from different seeds share it.
    assert other["tokenizer.json"] == _files(toy_model_dir)["tokenizer.json"]


# --- shape ------------------------------------------------------------------------------------------------

# build_toy_model's size keywords and defaults as they were written out before ToyShape (hand-copied oracle).
SHAPE_DEFAULTS = {
    "num_layers": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "hidden_size": 128,
    "moe_intermediate_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
}


def test_shape_defaults_and_config_names():
    assert dataclasses.asdict(ToyShape()) == SHAPE_DEFAULTS
    config = toy_config(ToyShape(num_layers=3, head_dim=64), dtype="bfloat16")
    assert config == toy_config(num_layers=3, head_dim=64, dtype="bfloat16")
    renamed = {"num_layers": "num_hidden_layers"}
    assert {renamed.get(k, k): config[renamed.get(k, k)] for k in SHAPE_DEFAULTS} == {
        renamed.get(k, k): v for k, v in (SHAPE_DEFAULTS | {"num_layers": 3, "head_dim": 64}).items()
    }
    assert config["torch_dtype"] == "bfloat16"
    with pytest.raises(TypeError, match="unknown toy shape field"):
        toy_config(num_heads=4)


def test_shape_keywords_toyshape_and_cli_build_the_same_model(tmp_path):
    sizes = dict(num_layers=1, num_experts=4, num_experts_per_tok=1, hidden_size=256)
    by_keywords = build_toy_model(tmp_path / "kw", bits=None, **sizes)
    by_shape = build_toy_model(tmp_path / "shape", ToyShape(**sizes), bits=None)
    assert _files(by_shape) == _files(by_keywords)
    config = _config(by_keywords)
    assert (config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]) == (1, 4, 1)
    assert config["hidden_size"] == 256 and config["moe_intermediate_size"] == 128
    argv = ["toy-model", "--save-path", str(tmp_path / "cli"), "--bits", "none", "--num-layers", "1"]
    assert cli_main(argv + ["--num-experts", "4", "--num-experts-per-tok", "1", "--hidden-size", "256"]) == 0
    assert _files(tmp_path / "cli") == _files(by_keywords)
    with pytest.raises(TypeError, match="unknown toy shape field"):
        build_toy_model(tmp_path / "bad", num_heads=4)
    assert cli_main(["toy-model", "--save-path", str(tmp_path / "bad"), "--num-experts-per-tok", "9"]) == 1
    assert not (tmp_path / "bad").exists()


# --- mlx-lm compatibility ---------------------------------------------------------------------------------


def test_mlx_lm_loads_and_generates(toy_model_dir):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(toy_model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which option is correct?"}], add_generation_prompt=True, enable_thinking=False
    )
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=8, sampler=make_sampler(temp=0.0))
    assert isinstance(text, str)

    logits = model(mx.array(np.arange(8 * 64).reshape(8, 64) % 2048))
    assert logits.shape == (8, 64, _config(toy_model_dir)["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)))


def test_config_has_quantization_block_with_8bit_router(toy_model_dir):
    config = _config(toy_model_dir)
    expected = {"group_size": 64, "bits": 3, "mode": "affine"}
    expected.update({f"model.layers.{i}.mlp.gate": {"group_size": 64, "bits": 8} for i in range(NUM_LAYERS)})
    assert config["quantization"] == expected
    assert config["quantization_config"] == expected
    assert config["model_type"] == "qwen3_moe"
    assert (config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]) == (4, 8, 2)
    for field in ("hidden_size", "moe_intermediate_size", "intermediate_size"):
        assert config[field] % 128 == 0
    assert config["num_attention_heads"] * config["head_dim"] % 128 == 0


def test_every_expert_stack_is_quantized_switch_linear(toy_model_dir):
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    model, _ = mlx_lm.load(str(toy_model_dir))
    stacks = {n: m for n, m in model.named_modules() if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))}
    assert len(stacks) == 3 * NUM_LAYERS
    for name, module in stacks.items():
        assert isinstance(module, QuantizedSwitchLinear), name
        assert (module.bits, module.group_size, module.num_experts) == (3, 64, NUM_EXPERTS), name
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert len(routers) == NUM_LAYERS and all(isinstance(r, nn.QuantizedLinear) and r.bits == 8 for r in routers)
    # No float matmul weight is left behind (quantize_model skips layers whose input does not divide).
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]


@pytest.mark.parametrize("bits,group_size", [(4, 32), (2, 128)])
def test_every_layer_quantizes_at_other_group_sizes(tmp_path, bits, group_size):
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    model, _ = mlx_lm.load(str(build_toy_model(tmp_path / "m", bits=bits, group_size=group_size)))
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "bits")}
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    for name, m in layers.items():
        want = (8, 64) if name.endswith("mlp.gate") else (bits, group_size)
        assert (m.bits, m.group_size) == want, name
    assert sum(isinstance(m, QuantizedSwitchLinear) for m in layers.values()) == 3 * NUM_LAYERS


def test_quantized_weights_are_the_float_weights_on_a_grid(toy_model_dir, toy_model_dir_fp):
    """Oracle: the unquantized build (same seed), and the packing read back by numpy, not by mlx."""
    config = _config(toy_model_dir)["quantization"]
    assert "quantization" not in _config(toy_model_dir_fp)
    fp = load_file(str(toy_model_dir_fp / "model.safetensors"))
    q = load_file(str(toy_model_dir / "model.safetensors"))
    checked = 0
    for name, w in fp.items():
        module = name.removesuffix(".weight")
        if f"{module}.scales" not in q:
            assert name.endswith("norm.weight") and np.array_equal(q[name], w), name
            continue
        params = config.get(module, config)
        bits, gs = params["bits"], params["group_size"]
        wq, scales, biases = q[name], q[f"{module}.scales"], q[f"{module}.biases"]
        assert w.dtype == np.float32 and scales.dtype == np.float32 and wq.dtype == np.uint32
        assert wq.shape == (*w.shape[:-1], w.shape[-1] * bits // 32), name
        codes = _unpack_codes(wq, bits, w.shape[-1])
        step = np.repeat(scales, gs, axis=-1)
        err = np.abs(codes * step + np.repeat(biases, gs, axis=-1) - w)
        # Within half a step, except group extremes clipped when the grid is snapped to hold zero (< 1 step).
        assert np.all(err <= np.abs(step) * 1.001 + 1e-7), name
        assert np.mean(err <= np.abs(step) * 0.5 * 1.001 + 1e-7) > 0.97, name
        checked += 1
    assert checked == 3 * NUM_LAYERS + 5 * NUM_LAYERS + 2  # experts; q/k/v/o + router; embed + lm_head


def test_initial_weights_look_trained(toy_model_dir_fp):
    from scipy.stats import kurtosis

    weights = load_file(str(toy_model_dir_fp / "model.safetensors"))
    q_proj = weights["model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < q_proj.std() < 0.03
    experts = weights["model.layers.1.mlp.switch_mlp.up_proj.weight"]
    assert experts.shape == (NUM_EXPERTS, 128, 128)
    assert kurtosis(experts.ravel()) > 0.5  # heavier tails than a Gaussian (excess kurtosis 0)
    assert not np.array_equal(experts[0], experts[1])
    assert np.all(weights["model.norm.weight"] == 1.0)


# --- tokenizer --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(toy_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(toy_model_dir))


def test_tokenizer_special_tokens_and_option_letters(hf_tokenizer, toy_model_dir):
    config = _config(toy_model_dir)
    assert len(hf_tokenizer) == config["vocab_size"]
    assert hf_tokenizer.eos_token == "<|im_end|>" and config["eos_token_id"] == hf_tokenizer.eos_token_id
    assert hf_tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(hf_tokenizer.encode(token, add_special_tokens=False)) == 1, token
    ids = set()
    for letter in OPTION_LETTERS:
        for text in (letter, " " + letter):
            encoded = hf_tokenizer.encode(text, add_special_tokens=False)
            assert len(encoded) == 1, text
            ids.add(encoded[0])
    assert len(ids) == 20
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode(" J", add_special_tokens=False)) == ["ĠJ"]
    # Qwen-style digits: one token each.
    assert len(hf_tokenizer.encode("2024", add_special_tokens=False)) == 4


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80).map(lambda s: unicodedata.normalize("NFC", s)))
def test_tokenizer_round_trips_text(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_round_trips_corpus_like_text(hf_tokenizer):
    text = "Question: What is 17 + 25?\nOptions:\nA. 42\nB. 41\nThe answer is \\boxed{A}. It's café-naïve ✓"
    assert hf_tokenizer.decode(hf_tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_empty_think_block(hf_tokenizer, toy_model_dir):
    from mlx_lm.tokenizer_utils import load as load_wrapper

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    header = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    off = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == header + "<think>\n\n</think>\n\n"
    on = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert on == header
    # A final assistant turn carries its (empty) think block, as in Qwen3 training data.
    done = hf_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    assert done == header + "<think>\n\n</think>\n\nHello.<|im_end|>\n"

    wrapper = load_wrapper(toy_model_dir)
    assert wrapper.has_thinking
    assert (
        wrapper.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == off
    )


def test_extra_corpus_words_get_merged():
    word = "Zorblaxian"
    plain = train_tokenizer()
    extended = train_tokenizer([f"The {word} council met the {word} envoy." for _ in range(200)])
    assert len(extended.encode(" " + word, add_special_tokens=False)) == 1
    assert len(plain.encode(" " + word, add_special_tokens=False)) > 1
    assert plain.backend_tokenizer.to_str() == train_tokenizer().backend_tokenizer.to_str()


def test_mlp_std_rescales_exactly_the_mlp_projections(toy_model_dir_fp, tmp_path):
    # Each tensor's draw depends only on (seed, name): the same values, scaled by new std / default std.
    import mlx.core as mx

    def weights(d):
        out = {}
        for f in sorted(d.glob("model*.safetensors")):
            out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
        return out

    default = weights(toy_model_dir_fp)
    wide = weights(build_toy_model(tmp_path / "wide", bits=None, mlp_std=(0.1, 0.02)))
    assert set(wide) == set(default)
    depth_scaled = 0.02 / (2 * 4) ** 0.5
    for name, w in wide.items():
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            ratio = 0.1 / 0.02
        elif name.endswith("down_proj.weight"):
            ratio = 0.02 / depth_scaled
        else:
            ratio = 1.0  # attention, router (mlp.gate), embeddings, head, norms
        np.testing.assert_allclose(w, default[name] * ratio, rtol=1e-6, atol=0, err_msg=name)


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bits": 7}, "bits=7"),
        ({"group_size": 16}, "group_size=16"),
        ({"dtype": "float64"}, "dtype="),
        ({"hidden_size": 192}, "hidden_size=192"),
        ({"moe_intermediate_size": 96}, "moe_intermediate_size=96"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
        ({"mlp_std": (0.1,)}, "mlp_std="),
        ({"mlp_std": (0.1, -0.02)}, "mlp_std="),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, field):
    with pytest.raises(ReqnoiseError, match=field):
        build_toy_model(tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_writes_loadable_identical_dir_and_refuses_existing(toy_model_dir, tmp_path, capsys):
    import mlx_lm

    out = tmp_path / "cli-model"
    env = dict(os.environ, PYTHONPATH=str(Path(reqnoise.__file__).parents[1]), PYTHONHASHSEED="12345")
    # A separate process (other hash seed): the bytes must still equal the in-process build.
    done = subprocess.run(
        [sys.executable, "-m", "reqnoise", "toy-model", "--save-path", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _files(out) == _files(toy_model_dir)
    mlx_lm.load(str(out))

    before = _files(out)
    assert cli_main(["toy-model", "--save-path", str(out), "--seed", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and str(out) in err[0]
    assert _files(out) == before

    assert cli_main(["toy-model", "--save-path", str(out), "--seed", "1", "--overwrite"]) == 0
    assert _files(out)["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-model"]  # no temporary siblings left

    assert cli_main(["toy-model", "--save-path", str(tmp_path / "fp"), "--bits", "none", "--dtype", "bfloat16"]) == 0
    assert "quantization" not in _config(tmp_path / "fp")
    assert _safetensors_dtypes(tmp_path / "fp" / "model.safetensors") == {"BF16"}
