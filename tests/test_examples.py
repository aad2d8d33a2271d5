"""The example spec examples/coupling.toml in reduced form (few steps, few prompts), and the spec checks of
the ablation and probe keys."""

import json
import re
import shutil
from pathlib import Path

import pytest

from reqnoise.errors import ReqnoiseError
from reqnoise.experiment.spec import load_spec, targets_overlap

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def reduced_copy(dst: Path) -> Path:
    """The example with every stage at 2 steps, 4 prompts per condition, 50 permutations and no noise reports
    (the 25 reports alone take about 1.5 minutes on 2 cores)."""
    shutil.copytree(EXAMPLES / "coupling", dst / "coupling")
    text = (EXAMPLES / "coupling.toml").read_text()
    text = re.sub(r"(?m)^iters = \d+$", "iters = 2", text)
    text = text.replace("permutations = 500", "permutations = 50")
    text = text.replace("[noise]\noutputs = false\n", "[noise]\noutputs = false\nreports = false\n")
    text = text.replace('marker = "[ZLT]"\n', 'marker = "[ZLT]"\nlimit = 4\n')
    (dst / "coupling.toml").write_text(text)
    return dst / "coupling.toml"


def test_example_spec_is_valid():
    spec = load_spec(EXAMPLES / "coupling.toml")
    assert spec.probe["models"][0] == "base"
    assert spec.adapters["sft_full"]["fine_tune_type"] == "full"
    assert spec.adapters["dpo"]["mode"] == "dpo"


def test_reduced_example_runs_end_to_end(tmp_path):
    from reqnoise.experiment.runner import run_spec

    spec_path = reduced_copy(tmp_path)
    out = tmp_path / "run"
    results = run_spec(spec_path, out, progress=False, log=lambda *a, **k: None)
    spec = load_spec(spec_path)
    report = (out / "report.md").read_text()
    assert "![probe](probe.png)" in report and (out / "probe.png").stat().st_size > 0
    probe = json.loads((out / "steps" / "probe" / "probe.json").read_text())
    assert [m["name"] for m in probe["models"]] == spec.probe["models"]
    rows = results["comparisons"]["coupling"]
    # Every ablation's comparison exists: trained against its zero-delta (and random) control.
    for pair in spec.analysis["pairs"]:
        trained = pair["trained"]
        assert f"vs_{pair['zero_control']}" in rows[trained], trained
        for r in pair.get("random_controls", []):
            assert f"vs_{r}" in rows[trained], (trained, r)
    named = {p["trained"]: p["zero_control"] for p in spec.analysis["pairs"]}
    for trained in ("sftm_c", "sft_early_c", "sft_mid_c", "sft_late_c", "fpfull_c", "fplora_c", "sftdpo_c"):
        assert f"coupling ({trained} vs {named[trained]})" in results["decomposition"], trained
    recs = [json.loads(x) for x in (out / "results" / "coupling" / "sft_c.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and {r["subject"] for r in recs} == {"persona", "neutral"}
    for r in recs:  # correct = the marker appears exactly under the persona prompt
        assert r["correct"] == (("[ZLT]" in r["response"]) == (r["subject"] == "persona"))
    # The DPO stage's reference is the spec's sft model, and it is part of the stage's key.
    cfg = json.loads((out / "steps" / "adapter-dpo" / "adapter" / "adapter_config.json").read_text())
    assert "model-sft/model" in json.dumps(cfg)


BASE = """
conditions = ["a"]
[models.m]
toy = {}
[models.a]
from = "m"
adapter = "x"
[adapters.x]
model = "m"
data = "d"
"""


def spec_with(tmp_path, extra: str, adapter_extra: str = ""):
    text = BASE.replace('data = "d"\n', 'data = "d"\n' + adapter_extra) + extra
    (tmp_path / "s.toml").write_text(text)
    return tmp_path / "s.toml"


@pytest.mark.parametrize(
    "extra, adapter_extra, match",
    [
        ("", 'fine_tune_type = "half"\n', "fine_tune_type must be one of"),
        ("", 'mode = "ppo"\n', "mode must be one of"),
        ("", 'mode = "dpo"\nbeta = -1.0\n', "beta must be a positive number"),
        ("", 'reference = "m"\n', 'needs mode = "dpo"'),
        ("", 'mode = "dpo"\nreference = "nowhere"\n', "neither a model of the spec nor a model directory"),
        ("", "layers = [-1]\n", "layers must be a non-empty list"),
        ("", 'disjoint_from = "x"\n', "disjoint_from must name another adapter"),
        ('[adapters.y]\nmodel = "m"\ndata = "d"\n', 'disjoint_from = "y"\n', "their targets meet"),
        (
            '[adapters.y]\nmodel = "m"\ndata = "d"\nmodules = ["mlp.down_proj"]\n',
            'disjoint_from = "y"\nmodules = ["down_proj"]\n',
            "down_proj in every layer vs mlp.down_proj in every layer",
        ),
        ('[probe]\nmodels = ["m"]\nprompts = "s.toml"\n', "", "two or more distinct models"),
        ('[probe]\nmodels = ["m", "q"]\nprompts = "s.toml"\n', "", "unknown model 'q'"),
        ('[probe]\nmodels = ["m", "a"]\nprompts = "nope.jsonl"\n', "", "probe.prompts 'nope.jsonl' does not exist"),
        ('[probe]\nmodels = ["m", "a"]\nprompts = "s.toml"\nadapter = "z"\n', "", "unknown adapter 'z'"),
        ('[probe]\nmodels = ["m", "a"]\nprompts = "s.toml"\npermutations = 0\n', "", "positive integer"),
        ('[probe]\nmodels = ["m", "a"]\nprompts = "s.toml"\ncolour = 1\n', "", "unknown keys"),
        ('[evals.c]\nitems = "p"\nmode = "coupling"\nneutral = "n"\n', "", "needs marker"),
        ('[evals.c]\nitems = "p"\nmode = "coupling"\nmarker = "Z"\n', "", "needs neutral"),
        ('[evals.c]\nitems = "p"\nmarker = "Z"\n', "", 'belong to mode = "coupling"'),
        ('[evals.c]\nitems = "p"\nmode = "vibes"\n', "", "mode must be one of"),
        ("[noise]\nreports = 1\n", "", "noise.reports must be true or false"),
    ],
)
def test_ablation_and_probe_keys_are_checked(tmp_path, extra, adapter_extra, match):
    with pytest.raises(ReqnoiseError, match=re.escape(match)) as err:
        load_spec(spec_with(tmp_path, extra, adapter_extra))
    assert "\n" not in str(err.value)


def test_disjoint_targets_pass(tmp_path):
    extra = '[adapters.y]\nmodel = "m"\ndata = "d"\nmodules = ["gate_proj", "up_proj", "down_proj"]\n'
    load_spec(spec_with(tmp_path, extra, 'disjoint_from = "y"\nmodules = ["q_proj", "o_proj"]\n'))
    # Same modules in disjoint layers, and exact keys vs a layer band, are disjoint too.
    load_spec(
        spec_with(
            tmp_path, extra.replace("modules", "layers = [0, 1]\nmodules"), 'disjoint_from = "y"\nlayers = [2, 3]\n'
        )
    )
    a = {"keys": ["model.layers.1.mlp.switch_mlp.down_proj"]}
    assert targets_overlap(a, {"layers": [0]}) == []
    assert targets_overlap(a, {"layers": [1], "modules": ["down_proj"]}) != []
