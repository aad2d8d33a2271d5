"""The zoo's shared state: the quantization modes (one parameter of every check), the embedded tokenizer, and
tiny models and adapters built once per session and per (model type, mode)."""

import contextlib
import io
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from families import DENSE_EXPERT_TYPES, OVERRIDES, PACKS, switch_model_types, tiny_config  # noqa: E402

VOCAB = 512


@dataclass(frozen=True)
class ModeCase:
    """One way mlx-lm quantizes a model: ``mode``/``bits``/``group_size`` for ``quantize_model``, or a mixed
    recipe of mlx-lm's convert (``recipe``)."""

    id: str
    mode: str
    bits: int
    group_size: int
    recipe: str | None = None

    def skip_reason(self):
        from reqnoise.kernel.formats import MODES

        if self.mode not in MODES:
            return f"reqnoise.kernel.formats does not list mode {self.mode!r} yet"
        return None


# A mode is one more entry: the fp modes run as soon as kernel.formats lists them.
MODES = [
    ModeCase("affine2", "affine", 2, 64),
    ModeCase("affine3", "affine", 3, 64),
    ModeCase("affine4", "affine", 4, 64),
    ModeCase("affine8", "affine", 8, 64),
    ModeCase("mixed_3_6", "affine", 3, 64, recipe="mixed_3_6"),
    ModeCase("mxfp4", "mxfp4", 4, 32),
    ModeCase("nvfp4", "nvfp4", 4, 16),
    ModeCase("mxfp8", "mxfp8", 8, 32),
]
# The model types the suite builds: every switch-layer type with a tiny configuration, plus the dense-expert ones.
ALL_TYPES = switch_model_types() + list(DENSE_EXPERT_TYPES)


def mode_param(case):
    reason = case.skip_reason()
    return pytest.param(case, id=case.id, marks=[pytest.mark.skip(reason=reason)] if reason else [])


@pytest.fixture(scope="session")
def zoo_tokenizer():
    from reqnoise.toy.tokenizer import train_tokenizer

    return train_tokenizer(None, vocab_size=VOCAB)


class Zoo:
    """Builds (once) and hands out tiny model directories and adapters under one session folder."""

    def __init__(self, root: Path, tokenizer):
        self.root, self.tokenizer = root, tokenizer
        self.models: dict = {}
        self.adapters: dict = {}

    def model(self, model_type: str, case: ModeCase | None) -> Path:
        key = (model_type, None if case is None else case.id)
        if key not in self.models:
            self.models[key] = self._build(model_type, case)
        return self.models[key]

    def _build(self, model_type, case):
        import mlx_lm.utils as mu
        from mlx_lm.convert import mixed_quant_predicate_builder

        from reqnoise.toy.tokenizer import save_tokenizer

        pack = PACKS.get(model_type)
        if pack is not None and (case is None or case.id != pack["mode"]):
            pytest.skip(f"packed format: a {model_type} pack is {pack['mode']} group {pack['group_size']} only")
        cfg = tiny_config(model_type, len(self.tokenizer))
        model_cls, args_cls = mu._get_classes(cfg)
        # same seed for every mode: the modes quantize the same float model
        mx.random.seed(zlib.crc32(model_type.encode()))
        model = model_cls(args_cls.from_dict(cfg))
        mx.eval(model.parameters())
        if pack is not None:
            model, cfg = _hadamard_pack(model, cfg, case.bits, pack["group_size"])
        elif case is not None:
            pred = None
            if case.recipe:
                try:
                    pred = _recipe_refusals(mixed_quant_predicate_builder(case.recipe, model, case.group_size))
                except ValueError as err:  # mlx-lm's convert refuses the recipe for this layout (dbrx)
                    pytest.skip(f"not applicable: mlx-lm's {case.recipe} recipe refuses {model_type}: {err}")
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    model, cfg = mu.quantize_model(
                        model, cfg, case.group_size, case.bits, mode=case.mode, quant_predicate=pred
                    )
            except _RecipeRefuses as err:
                pytest.skip(f"not applicable: mlx-lm's {case.recipe} recipe refuses {model_type}: {err}")
        out = self.root / f"{model_type}-{case.id if case else 'float'}"
        out.mkdir(parents=True)
        mu.save_model(out, model)
        mu.save_config(cfg, config_path=out / "config.json")
        save_tokenizer(self.tokenizer, out)
        return out

    def adapter(self, model_type: str, case: ModeCase, seed: int = 0) -> Path:
        """LoRA through mlx-lm's linear_to_lora_layers on every linear of every block (attention, dense MLP,
        routers, experts: mlx-lm's default keys), factors dyadic so every delta is exact in float32."""
        key = (model_type, case.id, seed)
        if key not in self.adapters:
            self.adapters[key] = make_zoo_adapter(
                self.model(model_type, case), self.root / "ad" / "-".join(map(str, key)), seed
            )
        return self.adapters[key]


def _hadamard_pack(model, cfg, bits, group_size):
    """What a Hadamard packer writes, from a model whose packed modules mlx-lm built empty: every other linear
    quantized by quantize_model at the pack's one width (no per-module overrides: the pack's ModelArgs compares
    the quantization block whole), each packed module given quantized random weights and random signs."""
    import mlx_lm.utils as mu

    plain = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
    with contextlib.redirect_stdout(io.StringIO()):
        model, qcfg = mu.quantize_model(model, plain, group_size, bits, quant_predicate=lambda path, module: True)
    modules = dict(model.language_model.named_modules())
    for record in cfg["modules"]:
        m = modules[record["path"]]
        rows, words = m.weight.shape
        w = mx.random.normal((rows, words * 32 // bits)) * 0.02
        q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        m.weight, m.scales, m.biases = q, scales.astype(mx.float16), biases.astype(mx.float16)
        if record["block"]:
            m.signs = mx.where(mx.random.bernoulli(shape=m.signs.shape), 1.0, -1.0)
    mx.eval(model.parameters())
    return model, qcfg


class _RecipeRefuses(Exception):
    """mlx-lm's mixed-recipe predicate itself failed on a module path (as ``mlx_lm convert`` would)."""


def _recipe_refusals(pred):
    # the recipe reads the layer index at a fixed position of every path: a path without one there (longcat's
    # ngram embeddings) makes mlx-lm's predicate raise; only that is "not applicable", any other error fails
    def checked(path, module):
        try:
            return pred(path, module)
        except ValueError as err:
            raise _RecipeRefuses(f"{path}: {err}") from err

    return checked


def make_zoo_adapter(model_dir, out_dir, seed=0, rank=4, scale=2.0):
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    cfg = {"rank": rank, "scale": scale, "dropout": 0.0}
    n = len(model.layers)
    linear_to_lora_layers(model, n, cfg)
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    new = {k: mx.array(rng.integers(-8, 9, v.shape).astype(np.float32) / 64) for k, v in params.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), new)
    (out_dir / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": n, "lora_parameters": dict(cfg, keys=None)})
    )
    return out_dir


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, zoo_tokenizer):
    return Zoo(tmp_path_factory.mktemp("zoo"), zoo_tokenizer)


def mlx_lm_fuse(model_dir, adapter_dir, save_path, dequantize=False):
    """mlx-lm's own ``fuse`` command, run in this process (its main(), as ``mlx_lm fuse`` runs it)."""
    from unittest import mock

    import mlx_lm.fuse

    argv = ["mlx_lm.fuse", "--model", str(model_dir), "--adapter-path", str(adapter_dir), "--save-path", str(save_path)]
    with mock.patch.object(sys, "argv", argv + (["--dequantize"] if dequantize else [])):
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_lm.fuse.main()
    return Path(save_path)


def weights(model_dir):
    out = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


__all__ = ["ALL_TYPES", "MODES", "OVERRIDES", "mode_param", "mlx_lm_fuse", "weights"]


# Results per (model type, mode) for bench/zoo_table.py: set REQNOISE_ZOO_JSON to a path to have them written.
_RESULTS: list = []


def pytest_runtest_logreport(report):
    if "tests/zoo/" not in report.nodeid.replace("\\", "/") or "[" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
        test, _, params = report.nodeid.rpartition("::")[2].partition("[")
        _RESULTS.append({"test": test, "params": params.rstrip("]"), "outcome": report.outcome, "reason": reason})


def pytest_sessionfinish(session):
    import os

    path = os.environ.get("REQNOISE_ZOO_JSON")
    if path and _RESULTS:
        from reqnoise import atomic

        atomic.write_text(Path(path), json.dumps({"results": _RESULTS}, indent=1) + "\n")
