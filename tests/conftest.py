"""Shared fixtures: the embedded toy MoE model, built once per test session."""

import pytest


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """The default toy model (qwen3_moe, 4 layers, 8 experts, 3-bit group 64, float32, seed 0)."""
    from reqnoise.toy.model import build_toy_model

    return build_toy_model(tmp_path_factory.mktemp("toy") / "toy-3bit")


@pytest.fixture(scope="session")
def toy_model_dir_fp(tmp_path_factory):
    """The same model (same seed, same tokenizer) left unquantized in float32."""
    from reqnoise.toy.model import build_toy_model

    return build_toy_model(tmp_path_factory.mktemp("toy") / "toy-fp", bits=None)
