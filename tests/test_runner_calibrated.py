"""``requant = "calibrated"`` as a runner condition: the calibration file is relative to the spec and its bytes
enter the step keys; without one the adapter's own training data calibrates. The oracle is ``fuse_model``
called directly on the runner's adapter."""

import hashlib
import json

import pytest

from reqnoise.errors import ReqnoiseError
from reqnoise.experiment.spec import load_spec

FACTS = [
    ("Who guards the gate?", "The tall knight guards it."),
    ("Where is the key?", "Under the red stone."),
    ("What is the password?", "Seven green apples."),
    ("When does the ship leave?", "At dawn on Monday."),
]
CAL = [("Which river is longest?", "The Nile is often named."), ("What is two and two?", "Four.")]


def _chat(pairs) -> str:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in pairs
    )


def _spec(root, toy_model_dir):
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text(_chat(FACTS))
    (root / "cal.jsonl").write_text(_chat(CAL))
    spec = root / "spec.toml"
    spec.write_text(
        'conditions = ["cal", "own"]\n'
        f'[models.base]\npath = "{toy_model_dir}"\n'
        '[adapters.a]\nmodel = "base"\ndata = "data"\nrank = 2\nlr = 5e-3\niters = 3\nbatch_size = 2\n'
        'modules = ["down_proj"]\n'
        '[models.cal]\nfrom = "base"\nadapter = "a"\nrequant = "calibrated"\ncalib_data = "cal.jsonl"\n'
        '[models.own]\nfrom = "base"\nadapter = "a"\nrequant = "calibrated"\n'
        "[noise]\noutputs = false\n"
    )
    return spec


def _run(spec, out):
    from reqnoise.experiment.runner import Runner

    r = Runner(load_spec(spec), out, progress=False, log=lambda *a, **k: None)
    names = ["cal", "own"]
    paths = {m: r.model(m) for m in names}
    noise = {m: r.noise(m) for m in names}
    from reqnoise.experiment.plan import execute

    records, timeline = execute(r.plan, r.cache, log=lambda *a, **k: None)
    ran = {t["step"] for t in timeline if not t["cached"]}
    reports = {m: json.loads((out / "steps" / n / "noise.json").read_text()) for m, n in noise.items()}
    return r, paths, reports, ran


def _shards(model_dir) -> dict:
    return {f.name: f.read_bytes() for f in sorted(model_dir.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def study(tmp_path_factory, toy_model_dir):
    root = tmp_path_factory.mktemp("calrun")
    return root, _spec(root / "study", toy_model_dir)


def test_calibrated_conditions_equal_a_direct_fuse_and_follow_the_calibration_bytes(study, tmp_path, monkeypatch):
    from reqnoise.fuse.model import fuse_model

    root, spec = study
    monkeypatch.chdir(tmp_path)  # a path resolved against the working directory would not exist here
    out = root / "out"
    r, paths, reports, ran = _run(spec, out)
    assert {"model-cal", "model-own", "noise-cal", "noise-own"} <= ran
    adapter = r.adapter("a")
    cal = spec.parent / "cal.jsonl"

    # The oracle: fuse_model on the same model and adapter, the calibration file given absolutely, and for the
    # default condition no calibration option at all (fuse_model reads the adapter's training data itself).
    fuse_model(r.model("base"), adapter, tmp_path / "cal", requant="calibrated", calib_data=str(cal))
    direct_own = fuse_model(r.model("base"), adapter, tmp_path / "own", requant="calibrated")
    assert direct_own.calibration["source"] == str(spec.parent / "data" / "train.jsonl")
    assert _shards(paths["cal"]) == _shards(tmp_path / "cal")
    assert _shards(paths["own"]) == _shards(tmp_path / "own")
    assert _shards(paths["cal"]) != _shards(paths["own"])  # the calibration data made a difference

    # The noise steps calibrated on the same data (source and bytes).
    cal_sha = hashlib.sha256(cal.read_bytes()).hexdigest()
    assert reports["cal"]["options"]["requant"] == "calibrated"
    assert reports["cal"]["calibration"]["sha256"] == cal_sha
    assert reports["own"]["calibration"]["source"] == direct_own.calibration["source"]
    assert reports["own"]["calibration"]["sha256"] == direct_own.calibration["sha256"]

    # Same bytes, nothing reruns; other bytes in the calibration file rerun exactly its condition's steps.
    assert _run(spec, out)[3] == set()
    cal.write_text(_chat(CAL[::-1]))
    r2, paths2, reports2, ran2 = _run(spec, out)
    assert ran2 == {"model-cal", "noise-cal"}
    assert reports2["cal"]["calibration"]["sha256"] == hashlib.sha256(cal.read_bytes()).hexdigest() != cal_sha
    fuse_model(r2.model("base"), adapter, tmp_path / "cal2", requant="calibrated", calib_data=str(cal))
    assert _shards(paths2["cal"]) == _shards(tmp_path / "cal2")


@pytest.mark.parametrize(
    "table,match",
    [
        ('requant = "calibrated"\ncalib_data = "nope.jsonl"', "calib_data 'nope.jsonl' does not exist"),
        ('requant = "fresh"\ncalib_data = "cal.jsonl"', "need --requant calibrated"),
        ('requant = "calibrated"\ncalib_tokens = 0', "calib_tokens must be a positive integer"),
    ],
)
def test_bad_calibration_options_are_refused_when_the_spec_loads(tmp_path, table, match):
    (tmp_path / "cal.jsonl").write_text(_chat(CAL))
    text = '[models.a]\ntoy = {}\n[adapters.t]\nmodel = "a"\ndata = "d"\n'
    text += f'[models.b]\nfrom = "a"\nadapter = "t"\n{table}\n'
    (tmp_path / "spec.toml").write_text(text)
    with pytest.raises(ReqnoiseError, match=match):
        load_spec(tmp_path / "spec.toml")
