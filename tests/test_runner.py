"""The experiment runner: spec checks, and a reduced demo end to end (structure and the invariants that
cannot depend on luck: keep-grid A0 identical to its base, the lock written before training, resumption)."""

import json

import pytest

from reqnoise.errors import ReqnoiseError
from reqnoise.experiment.spec import load_spec


def write(tmp_path, text, name="spec.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,match",
    [
        ("x = 1", "no \\[models"),
        ('[models.a]\npath = "p"\ntoy = {}', "exactly one of"),
        ('[models.a]\nfrom = "b"\nadapter = "c"', "unknown model 'b'"),
        ('[models.a]\ntoy = {}\n[models.b]\nfrom = "a"\nadapter = "z"', "unknown adapter 'z'"),
        ('[models.a]\nfrom = "b"\nquantize = {bits = 3}\n[models.b]\nfrom = "a"\nquantize = {bits = 3}', "cycle"),
        ('[models.a]\ntoy = {}\n[adapters.t]\nmodel = "a"\ndata = "setg:train"', "no \\[setg\\]"),
        ('[models.a]\ntoy = {}\n[adapters.t]\nmodel = "a"\ndata = "d"\nrnak = 4', "unknown keys \\['rnak'\\]"),
        ('conditions = ["b"]\n[models.a]\ntoy = {}', "unknown model 'b'"),
        ('conditions = ["a"]\n[models.a]\ntoy = {}\n[criteria]\nfile = "nope.toml"\neval = "e"', "does not exist"),
        ("[models.a\n", "not valid TOML"),
        (
            'conditions = ["a"]\n[models.a]\ntoy = {}\n[evals.e]\nitems = "i"\ncalibrate = "yes"',
            "calibrate must be true, false or",
        ),
        (
            'conditions = ["a"]\n[models.a]\ntoy = {}\n[evals.e]\nitems = "i"\nmode = "generate"\ncalibrate = true',
            "calibrate needs mode",
        ),
        (
            'conditions = ["a"]\n[models.a]\ntoy = {}\n[evals.e]\nitems = "i"\n[analysis]\neval = "e"\nbaseline = "a"\n'
            'trained = "a"\nzero_control = "a"\n'
            'pairs = [{ trained = "a", zero_control = "a", trained_controls = ["b"] }]',
            "analysis.pairs entries are",
        ),
        (
            'conditions = ["a"]\n[models.a]\ntoy = {}\n[evals.e]\nitems = "i"\n[analysis]\neval = "e"\nbaseline = "a"\n'
            'trained = "a"\nzero_control = "a"\npairs = [{ trained = "a", zero_control = "a", contorls = [] }]',
            "analysis.pairs entries are",
        ),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(tmp_path, text, match):
    with pytest.raises(ReqnoiseError, match=match):
        load_spec(write(tmp_path, text))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from reqnoise.toy.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    logs = []
    results = run_demo(out, quick=True, progress=False, log=logs.append)
    return out, results, logs


@pytest.mark.slow
def test_reduced_demo_structure(demo_run):
    from reqnoise.toy.demo import HELDOUT_MODELS as HELDOUT
    from reqnoise.toy.demo import RECALL_MODELS

    out, results, logs = demo_run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {
        "conditions",
        "comparisons",
        "decomposition",
        "noise",
        "identity",
        "verdict",
        "steps",
        "checks",
    }
    for cond in (
        "persona",
        "A1_fresh",
        "A0_fresh",
        "A1_keep",
        "A0_keep",
        "P1_fresh",
        "P0_fresh",
        "S1_fresh",
        "R1_fresh",
        "L1_fresh",
        "L0_fresh",
        "L1_keep",
        "L0_keep",
        "LR1_fresh",
    ):
        evals = ("setg_test",) + ("recall_trained",) * (cond in RECALL_MODELS) + ("recall_heldout",) * (cond in HELDOUT)
        assert set(saved["conditions"][cond]) - {"all"} == set(evals)  # "all": the eval Set G is built from
        for ev in evals:
            row = saved["conditions"][cond][ev]
            assert 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
    assert "R1_fresh" not in RECALL_MODELS and "LR1_fresh" not in RECALL_MODELS
    assert saved["conditions"]["persona"]["setg_test"]["accuracy"] == 0  # Set G: wrong by construction
    assert {
        "setg_test",
        "recall_trained",
        "setg_test (P1_fresh vs P0_fresh)",
        "recall_trained (P1_fresh vs P0_fresh)",
    } <= set(saved["decomposition"])
    assert "vs_zero_control" in saved["comparisons"]["setg_test"]["A1_fresh"]
    # The all-layers, all-linear arm: its pairs, controls and decomposition, on every adaptable module.
    assert "setg_test (L1_fresh vs L0_fresh)" in saved["decomposition"]
    assert {"vs_L0_fresh", "vs_LR1_fresh", "vs_baseline"} <= set(saved["comparisons"]["setg_test"]["L1_fresh"])
    trained = json.loads((out / "steps" / "adapter-factual_all" / "step.json").read_text())
    fused = json.loads((out / "steps" / "model-L0_fresh" / "model" / "fuse_report.json").read_text())
    assert len(fused["modules"]) == 4 * 8 and fused["control"] == "zero"  # 4 layers x (q, k, v, o, router, 3 experts)
    assert len(trained["summary"]["modules"]) == 32  # mlx-lm adapted every adaptable module of every block
    # The floor ran on the persona before stage 2 and was printed; keep-grid rows are zero.
    floor_at = next(i for i, line in enumerate(logs) if "floor of each arm's target" in line)
    assert floor_at < next(i for i, line in enumerate(logs) if "adapter-factual" in line and "cached" not in line)
    rows = saved["floor"]["rows"]
    assert {r["group"] for r in rows} == {"experts.down_proj@1-3", "all-linear", "attention"}
    assert all(r["changed"] == 0 and r["codes_changed"] == 0 for r in rows if r["requant"] == "keep-grid")
    assert saved["floor"]["n"] == saved["conditions"]["persona"]["setg_test"]["n"]
    assert saved["floor"]["accuracy"] == 0  # scored with the prior Set G was built with, as the setg_test eval
    assert {"train", "eval", "floor"} <= set(saved["timing"]["stages"])
    assert any(line.startswith("total (wall)") for line in logs[-1].splitlines() + logs[-2].splitlines())
    assert {"vs_P0_fresh", "vs_S1_fresh"} <= set(saved["comparisons"]["recall_trained"]["P1_fresh"])
    # Cloze records: one score per option, calibrated within each subject.
    rec = json.loads((out / "results" / "recall_trained" / "P1_fresh.jsonl").read_text().splitlines()[0])
    assert rec["mode"] == "cloze" and len(rec["option_logprobs"]) == 4 and "raw_prediction" in rec
    assert saved["verdict"]["text"] and isinstance(saved["verdict"]["met"], bool)
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file() and (out / "flips.png").is_file()
    assert (out / "steps" / "noise-A1_fresh" / "noise.png").is_file()
    assert "kill criterion" in logs[-3] or any("kill criterion" in line for line in logs)


@pytest.mark.slow
def test_reduced_demo_invariants(demo_run):
    out, results, _ = demo_run
    checks = {c["text"].split(":")[0]: c["ok"] for c in results["checks"]}
    assert checks["keep-grid zero-delta control A0 has weights bit-identical to the persona model"]
    assert checks["keep-grid zero-delta control L0 has weights bit-identical to the persona model"]
    assert all(ok for text, ok in checks.items() if text.startswith("keep-grid A0 answers every"))
    # The artifact line counts the zero deltas' changed answers; recount them from the saved records.
    line = next(c["text"] for c in results["checks"] if "(the artifact)" in c["text"])

    def predictions(cond):
        text = (out / "results" / "setg_test" / f"{cond}.jsonl").read_text()
        return {r["id"]: r["prediction"] for r in map(json.loads, text.splitlines())}

    ref = predictions("persona")
    for cond in ("A0_fresh", "P0_fresh"):
        ours = predictions(cond)
        changed = sum(ours[k] != v for k, v in ref.items())
        assert f"{changed} of {len(ref)} answers changed" in line.split(f"{cond[:2]} ")[1].split(" nats")[0]
    # The criteria were locked before any training step ran.
    lock = json.loads((out / "lock.json").read_text())
    from datetime import datetime

    locked = datetime.fromisoformat(lock["locked_at"].replace("Z", "+00:00")).timestamp()
    for step in (out / "steps").glob("adapter-*/step.json"):
        assert step.stat().st_mtime >= locked - 1


@pytest.mark.slow
def test_resumed_run_reuses_finished_steps_and_reruns_only_dependents(demo_run, tmp_path):
    from reqnoise.experiment.runner import run_spec

    out, _, _ = demo_run
    logs = []
    run_spec(out / "spec.toml", out, progress=False, log=logs.append)
    ran = [line for line in logs if line.startswith("[") and "cached" not in line and "locked" not in line]
    assert not ran, ran
    # Change the stage-2 adapter only: the toy, knowledge, base, persona and Set G stay cached.
    spec = (out / "spec.toml").read_text().replace("[adapters.factual]\n", "[adapters.factual]\nseed = 7\n")
    (out / "spec.toml").write_text(spec)
    logs = []
    run_spec(out / "spec.toml", out, progress=False, log=logs.append)
    rerun = {
        line.split("] ", 1)[1]
        for line in logs
        if line.startswith("[") and "cached" not in line and "locked" not in line
    }
    cached = {line.split("] ", 1)[1] for line in logs if line.startswith("[cached]")}
    assert {
        "model-toy",
        "adapter-knowledge",
        "model-base",
        "adapter-identity",
        "model-persona",
        "setg",
        "adapter-shuffled",
        "model-S1_fresh",
        "adapter-recall",
        "model-P1_fresh",
    } <= cached
    assert "adapter-factual" in rerun and "model-A1_fresh" in rerun
    assert "eval-setg_test-persona" in cached


# ---------------------------------------------------------------- the lock binds the results (issue 14 §1)
# Two ready-made models (the session's toy fixtures, as `path` models) and six items: a run is evaluation
# only, a few seconds, so the lock's scenarios can run end to end through the real runner.


def _small_study(tmp_path, toy_model_dir, toy_model_dir_fp, criteria=True):
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Which is {w}?", "options": ["red", "blue", w], "answer": "C"})
            + "\n"
            for i, w in enumerate(["green", "black", "white", "pink", "grey", "gold"])
        )
    )
    (tmp_path / "criteria.toml").write_text('kill_if = "acc(q3) > 2 or acc(fp) > 2"\n')
    text = (
        'name = "lock scenarios"\nconditions = ["q3", "fp"]\n'
        f'[models.q3]\npath = "{toy_model_dir}"\n[models.fp]\npath = "{toy_model_dir_fp}"\n'
        '[evals.e]\nitems = "items.jsonl"\n'
    )
    if criteria:
        text += '[criteria]\nfile = "criteria.toml"\neval = "e"\n'
    return write(tmp_path, text)


def _run(spec, out, **kw):
    from reqnoise.experiment.runner import run_spec

    return run_spec(spec, out, progress=False, log=lambda *a, **k: None, **kw)


def test_criteria_added_after_the_results_are_not_preregistered(tmp_path, toy_model_dir, toy_model_dir_fp):
    out = tmp_path / "out"
    first = _run(_small_study(tmp_path, toy_model_dir, toy_model_dir_fp, criteria=False), out)
    assert first["verdict"] is None
    # The results have been seen; now the criteria are added and the spec rerun: every eval comes from the cache.
    results = _run(_small_study(tmp_path, toy_model_dir, toy_model_dir_fp, criteria=True), out)
    v = results["verdict"]
    assert v is not None and "NOT pre-registered" in v["text"].splitlines()[0], v and v["text"]
    assert v["preregistered"] is False
    assert json.loads((out / "results.json").read_text())["verdict"]["preregistered"] is False
    assert "NOT pre-registered" in (out / "report.md").read_text()


def test_criteria_from_the_start_are_preregistered_also_after_a_resume(
    tmp_path, toy_model_dir, toy_model_dir_fp, monkeypatch
):
    from reqnoise.experiment import runner

    spec = _small_study(tmp_path, toy_model_dir, toy_model_dir_fp)
    # Interrupted: the second evaluation dies (as a Ctrl-C would), after the lock and the first eval step.
    real, calls = runner.evaluate_items, []

    def dies_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "evaluate_items", dies_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(spec, out)
    assert (out / "lock.json").is_file() and not (out / "results.json").exists()
    monkeypatch.setattr(runner, "evaluate_items", real)
    resumed = _run(spec, out)
    assert resumed["verdict"]["preregistered"] is True
    assert "NOT pre-registered" not in resumed["verdict"]["text"]
    # Served again from the cache (fresh copies in results/), the provenance is what it was when computed.
    sidecar = out / "results" / "e" / "q3.provenance.json"
    before = sidecar.read_text()
    again = _run(spec, out)
    assert again["verdict"]["preregistered"] is True and sidecar.read_text() == before
    fresh = tmp_path / "fresh"
    assert _run(spec, fresh)["verdict"]["preregistered"] is True


def test_results_recomputed_after_the_lock_from_models_made_before_it_are_not_preregistered(tmp_path, toy_model_dir_fp):
    # The evaluation reruns after the lock (its options changed), but the model it scores was made before:
    # the provenance of every upstream step counts, not only the evaluation's.
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Is {w} a colour?", "options": ["yes", "no"], "answer": "A"}) + "\n"
            for i, w in enumerate(["red", "blue", "green", "pink"])
        )
    )
    (tmp_path / "criteria.toml").write_text('kill_if = "acc(q) > 2"\n')
    base = (
        'conditions = ["q"]\n'
        f'[models.fp]\npath = "{toy_model_dir_fp}"\n'
        '[models.q]\nfrom = "fp"\nquantize = { bits = 4, group_size = 64 }\n'
        '[evals.e]\nitems = "items.jsonl"\n'
    )
    out = tmp_path / "out"
    _run(write(tmp_path, base), out)
    spec = write(tmp_path, base + 'batch_size = 2\n[criteria]\nfile = "criteria.toml"\neval = "e"\n')
    v = _run(spec, out)["verdict"]
    assert not v["preregistered"] and len(v["provenance"]) == 1, v["text"]
    assert "model-q computed" in v["provenance"][0] and "with no lock" in v["provenance"][0]
    assert "eval-e-q" not in v["provenance"][0]  # the evaluation itself ran under the lock
    steps = json.loads((out / "results" / "e" / "q.provenance.json").read_text())["steps"]
    assert list(steps) == ["model-q", "eval-e-q"]


def test_a_model_with_the_tensors_of_an_evaluated_one_gets_its_records_without_a_rerun(
    tmp_path, toy_model_dir, toy_model_dir_fp
):
    """A keep-grid zero-delta fuse rewrites the shards (another layout) and adds fuse_report.json, but computes
    with the same tensors: its eval copies the source's records. A fresh zero-delta fuse moves codes: it runs."""
    from fuse_helpers import make_adapter
    from reqnoise.eval.multiple_choice import evaluate_items
    from reqnoise.experiment.runner import run_spec
    from reqnoise.fuse.model import fuse_model

    adapter = make_adapter(toy_model_dir, tmp_path / "ad")
    twin, moved = tmp_path / "twin", tmp_path / "moved"
    fuse_model(toy_model_dir, adapter, twin, requant="keep-grid", control="zero", progress=False)
    fuse_model(toy_model_dir, adapter, moved, requant="fresh", control="zero", progress=False)
    assert (twin / "fuse_report.json").is_file()
    spec = _small_study(tmp_path, toy_model_dir, toy_model_dir_fp, criteria=False)
    spec.write_text(
        spec.read_text()
        .replace('conditions = ["q3", "fp"]', 'conditions = ["q3", "fp", "twin", "moved"]')
        .replace("[evals.e]", f'[models.twin]\npath = "{twin}"\n[models.moved]\npath = "{moved}"\n[evals.e]')
    )
    out = tmp_path / "out"
    logs = []
    run_spec(spec, out, progress=False, log=logs.append)
    step = lambda m: json.loads((out / "steps" / f"eval-e-{m}" / "step.json").read_text())["summary"]  # noqa: E731
    assert step("twin")["same_weights_as"] == "q3"
    assert all("same_weights_as" not in step(m) for m in ("q3", "fp", "moved"))
    assert any("eval-e-twin: the model computes with q3's tensors" in line for line in logs)
    # The oracle: the twin evaluated on its own, outside the runner.
    recs, _ = evaluate_items(twin, tmp_path / "items.jsonl", progress=False)
    saved = [json.loads(line) for line in (out / "results" / "e" / "twin.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"], r["correct"]) for r in saved] == [
        (r["id"], r["prediction"], r["correct"]) for r in recs
    ]
