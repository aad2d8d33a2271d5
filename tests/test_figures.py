"""Figures from a hand-made results.json: classification of forest rows against hand-computed CIs, role
grouping, PNG size and metadata read back from the bytes (PNG chunk layout, not matplotlib), label sizes, and
`reqnoise report` giving the same bytes twice."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from reqnoise.cli import main
from reqnoise.errors import ReqnoiseError
from reqnoise.experiment import figures
from reqnoise.experiment.figures import analysis_roles, condition_groups, forest_rows
from reqnoise.stats.inference import classify_interval

N = 40  # paired items per evaluation
EVALS = ("setg_test", "recall")
CONDITIONS = ("base", "persona", "A1", "A0", "A1k", "A0k", "P1", "P0", "S1", "R1", "R2")
ANALYSIS = {
    "eval": "setg_test",
    "baseline": "persona",
    "trained": "A1",
    "zero_control": "A0",
    "random_controls": ["R1", "R2"],
    "pairs": [["A1k", "A0k"], {"trained": "P1", "zero_control": "P0", "trained_controls": ["S1"]}],
}


def comp(fixed, broken, ci):
    """A Comparison dict as results.json holds it: difference = (fixed - broken) / N."""
    return {
        "n": N,
        "difference": (fixed - broken) / N,
        "difference_ci": ci,
        "ci_method": "hand-made",
        "mcnemar_p": 0.5,
        "fixed": fixed,
        "broken": broken,
        "both_right": 10,
        "both_wrong": N - 10 - fixed - broken,
        "flip_rate": (fixed + broken) / N,
    }


def acc(k):
    return {"n": N, "correct": k, "accuracy": k / N, "ci_low": max(0, k / N - 0.12), "ci_high": min(1, k / N + 0.12)}


# The CIs (fractions) by hand, and the class each must get against the 5 pp margin.
CIS = {
    ("A1", "A0"): ([0.05, 0.20], "effect"),  # 5 fixed - 0 broken over 40 = +12.5 pp
    ("A1", "R1"): ([-0.03, 0.04], "equivalent"),
    ("A1", "R2"): ([-0.02, 0.10], "inconclusive"),
    ("A1k", "A0k"): ([-0.05, 0.05], "equivalent"),  # bounds on the margin count as inside
    ("P1", "P0"): ([-0.30, -0.10], "effect"),
    ("P1", "S1"): ([0.01, 0.03], "equivalent"),  # inside the margin although it excludes 0
}
FLIPS = {("A1", "A0"): (5, 0), ("A1", "R1"): (1, 1), ("A1", "R2"): (3, 1), ("A1k", "A0k"): (0, 0)}
FLIPS |= {("P1", "P0"): (0, 8), ("P1", "S1"): (1, 0)}


def hand_results(with_analysis=True):
    conds = {c: {ev: acc(4 + 2 * i + j) for j, ev in enumerate(EVALS)} for i, c in enumerate(CONDITIONS)}
    comps = {}
    for ev in EVALS:
        rows = {c: {} for c in CONDITIONS if c not in ("base",)}
        for c in rows:
            if c != "persona":
                rows[c]["vs_baseline"] = comp(2, 1, [-0.05, 0.1])
            if c != "A0":
                rows[c]["vs_zero_control"] = comp(3, 2, [-0.1, 0.12])
        for (t, c), (ci, _) in CIS.items():
            key = "vs_zero_control" if c == "A0" else f"vs_{c}"
            rows[t][key] = comp(*FLIPS[(t, c)], ci)
        comps[ev] = rows
    dec = {}
    for ev in EVALS:
        dec[ev] = {"n": N, "random_effects": [-0.025, 0.05], "components": [], "table": "..."}
        dec[f"{ev} (A1k vs A0k)"] = {"n": N, "random_effects": [], "components": [], "table": "..."}
        dec[f"{ev} (P1 vs P0)"] = {"n": N, "random_effects": [], "components": [], "table": "..."}
    results = {
        "name": "hand-made study",
        "spec": "/nonexistent/spec.toml",
        "conditions": conds,
        "comparisons": comps,
        "decomposition": dec,
        "noise": {"A1": {"verdict": "adapter survives"}, "A0": {"verdict": "zero-delta control"}},
        "identity": {},
        "verdict": None,
        "steps": [{"step": "eval-x", "cached": True, "seconds": 1.0}],
    }
    if with_analysis:
        results["analysis"] = ANALYSIS
    return results


def noise_rows(zero=False):
    """2 module types x layers 1..2 x 4 experts, plus one dense attention module on layer 1."""
    rows = []
    for t in ("down_proj", "up_proj"):
        for layer in (1, 2):
            for e in range(4):
                rows.append(
                    {
                        "module": f"model.layers.{layer}.mlp.switch_mlp.{t}",
                        "layer": layer,
                        "expert": e,
                        "delta_cosine": None if zero else 0.9 - 0.3 * e + 0.05 * layer,
                        "code_change_frac": 0.01 * (e + layer),
                    }
                )
    rows.append(
        {
            "module": "model.layers.1.self_attn.q_proj",
            "layer": 1,
            "expert": None,
            "delta_cosine": None if zero else -0.1,
            "code_change_frac": 0.2,
        }
    )
    return rows


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    for cond, zero in (("A1", False), ("A0", True)):
        p = d / "steps" / f"noise-{cond}" / "noise.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"modules": noise_rows(zero), "verdict": "x"}))
    (d / "results.json").write_text(json.dumps(hand_results()))
    return d


def png_info(path):
    """(width, height, chunk types, tEXt keywords) straight from the PNG bytes (PNG spec, section 5)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, chunks, keys = 8, [], []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        chunks.append(kind.decode())
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keys.append(body.split(b"\0", 1)[0].decode())
        pos += 12 + length
    width, height = struct.unpack(">II", data[16:24])
    return width, height, chunks, keys


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo, hi, margin, expected",
    [
        (-0.03, 0.04, 0.05, "equivalent"),
        (-0.05, 0.05, 0.05, "equivalent"),
        (0.01, 0.03, 0.05, "equivalent"),
        (0.02, 0.12, 0.05, "effect"),
        (-0.12, -0.001, 0.05, "effect"),
        (-0.02, 0.10, 0.05, "inconclusive"),
        (-0.06, 0.0, 0.05, "inconclusive"),
        (-0.02, 0.10, 0.10, "equivalent"),
        (0.0, 0.2, 0.05, "inconclusive"),  # touches 0: does not exclude it
    ],
)
def test_classify_hand_computed(lo, hi, margin, expected):
    assert classify_interval((lo, hi), (lo, hi), margin) == expected


def test_classify_uses_the_tost_interval_for_equivalence():
    # 90% CI inside the margin, 95% CI not: equivalent (TOST at 5%); a 95% CI off zero alone: effect
    assert classify_interval((-0.04, 0.045), (-0.05, 0.055), 0.05) == "equivalent"
    assert classify_interval((0.02, 0.09), (0.01, 0.10), 0.05) == "effect"
    assert classify_interval((-0.01, 0.09), (-0.02, 0.10), 0.05) == "inconclusive"


@pytest.mark.parametrize("lo, hi, margin", [(0.1, 0.0, 0.05), (float("nan"), 0.1, 0.05), (-0.1, 0.1, 0.0)])
def test_classify_rejects_bad_input(lo, hi, margin):
    with pytest.raises(ReqnoiseError):
        classify_interval((lo, hi), (lo, hi), margin)


@pytest.mark.parametrize("with_analysis", [True, False])
def test_forest_rows_classes_and_band(with_analysis, tmp_path):
    results = hand_results(with_analysis)
    if not with_analysis:  # the roles then come from the spec file results.json names
        spec = tmp_path / "spec.toml"
        spec.write_text(
            '[analysis]\neval = "setg_test"\nbaseline = "persona"\ntrained = "A1"\nzero_control = "A0"\n'
            'random_controls = ["R1", "R2"]\npairs = [["A1k", "A0k"], '
            '{ trained = "P1", zero_control = "P0", trained_controls = ["S1"] }]\n'
        )
        results["spec"] = str(spec)
    roles = analysis_roles(results)
    assert roles["source"] == ("results" if with_analysis else "spec")
    rows = forest_rows(results, roles)
    assert list(rows) == list(EVALS)
    for ev in EVALS:
        got = [(r["trained"], r["control"], r["ci"], r["cls"]) for r in rows[ev]]
        assert got == [(t, c, ci, cls) for (t, c), (ci, cls) in CIS.items()]
        for r in rows[ev]:
            f, b = FLIPS[(r["trained"], r["control"])]
            assert r["difference"] == pytest.approx((f - b) / N)
            # The random band (min..max of random - zero) sits on the main zero-delta row only.
            assert r["band"] == ([-0.025, 0.05] if (r["trained"], r["control"]) == ("A1", "A0") else None)


def test_forest_margin_from_results_and_missing_ci():
    results = hand_results()
    results["margin"] = 0.10
    for ev in EVALS:
        del results["comparisons"][ev]["P1"]["vs_S1"]["difference_ci"]
    rows = {(r["trained"], r["control"]): r for r in forest_rows(results)["setg_test"]}
    assert rows[("A1", "R2")]["cls"] == "equivalent"  # [-2, 10] pp inside +-10 pp
    assert rows[("A1", "A0")]["cls"] == "effect"  # [5, 20] pp leaves the margin and excludes 0
    assert rows[("P1", "S1")]["ci"] is None and rows[("P1", "S1")]["cls"] is None


def test_roles_inferred_from_rows():
    results = hand_results(with_analysis=False)
    roles = analysis_roles(results)
    assert roles["source"] == "inferred"
    assert (roles["baseline"], roles["trained"], roles["zero_control"]) == ("persona", "A1", "A0")
    assert [(p["trained"], p["zero_control"], p["trained_controls"]) for p in roles["pairs"]] == [
        ("A1k", "A0k", []),
        ("P1", "P0", ["S1"]),
    ]
    assert roles["trained_controls"] == ["R1", "R2"]  # vs_<name> rows of the main adapter


def test_condition_groups():
    results = hand_results()
    roles = analysis_roles(results)
    assert condition_groups(results, roles) == [
        ("baseline", ["persona"]),
        ("study arm", ["A1", "A1k", "P1"]),  # adapters unknown without the spec: all trained ones
        ("controls", ["A0", "A0k", "P0", "S1", "R1", "R2"]),
        ("other", ["base"]),
    ]
    roles["adapter"] = {"A1": "factual", "A1k": "factual", "P1": "recall"}
    assert ("positive control", ["P1"]) in condition_groups(results, roles)
    assert ("study arm", ["A1", "A1k"]) in condition_groups(results, roles)


def test_noise_module_type():
    assert figures._module_type("model.layers.3.mlp.switch_mlp.down_proj") == "mlp.down_proj"
    assert figures._module_type("model.layers.0.self_attn.q_proj") == "self_attn.q_proj"
    assert figures._module_type("lm_head") == "lm_head"


@pytest.mark.parametrize("name", ["forest", "accuracy", "flips", "survival"])
def test_labels_at_least_8pt(name):
    results = hand_results()
    if name == "survival":
        fig = figures.build_survival(noise_rows(), "title")
    else:
        with figures._style():
            fig = getattr(figures, f"build_{name}")(results)
    fig.canvas.draw()  # tick labels exist only once drawn
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))]
    texts = [t for t in texts if t.get_visible() and t.get_text().strip()]
    assert texts
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 8]
    assert not small


def test_draw_figures_pngs_and_bytes(run_dir, tmp_path):
    results = json.loads((run_dir / "results.json").read_text())
    a = figures.draw_figures(results, tmp_path / "a", base_dir=run_dir)
    b = figures.draw_figures(results, tmp_path / "b", base_dir=run_dir)
    names = ["forest.png", "accuracy.png", "flips.png", "survival-A1.png", "survival-A0.png"]
    assert [p.name for p in a] == names == [p.name for p in b]
    for pa, pb in zip(a, b):
        width, height, chunks, keys = png_info(pa)
        assert 500 <= width <= 1600 and 300 <= height <= 2400, (pa.name, width, height)
        assert "tIME" not in chunks and "Software" not in keys, (pa.name, chunks, keys)
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_survival_needs_rows(tmp_path):
    results = hand_results()
    assert figures.plot_survival(results, tmp_path / "x.png", "A1", base_dir=tmp_path) is None
    results["noise"]["A1"]["modules"] = noise_rows()
    assert figures.plot_survival(results, tmp_path / "x.png", "A1") == tmp_path / "x.png"


def test_cli_report_twice_same_bytes(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    first = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "results.json"}
    assert {"forest.png", "accuracy.png", "flips.png", "survival-A1.png", "report.md"} <= set(first)
    assert main(["report", str(run_dir)]) == 0
    again = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "results.json"}
    assert again == first
    out = tmp_path / "elsewhere"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    moved = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: v for k, v in moved.items() if k.endswith(".png")} == {
        k: v for k, v in first.items() if k.endswith(".png")
    }
    md = (run_dir / "report.md").read_text()
    assert "forest.png" in md and "accuracy.png" in md


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "results.json" in err and len(err.splitlines()) == 1
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_help_does_not_import_matplotlib():
    code = (
        "import sys; from reqnoise.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('matplotlib', 'reqnoise.experiment.figures') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
