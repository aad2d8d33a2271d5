"""The experiment report from plain data: accuracy rows count an unparsed answer as wrong, and the report can
be redrawn from a saved results.json alone."""

import json

from statsmodels.stats.proportion import proportion_confint

from reqnoise.eval.records import write_records
from reqnoise.experiment.report import accuracy_row, collect, render_markdown, write_outputs


def rec(i, correct, parsed):
    return {"id": f"q{i}", "subject": None, "correct": correct, "parsed": parsed, "prediction": "A", "answer": "A"}


def test_an_unparsed_answer_is_wrong_even_when_marked_correct():
    # 2 right and parsed, 1 "correct" but unparsed (e.g. a record written by another tool), 2 wrong.
    records = [rec(0, True, True), rec(1, True, True), rec(2, True, False), rec(3, False, True), rec(4, False, False)]
    row = accuracy_row(records)
    lo, hi = proportion_confint(2, 5, alpha=0.05, method="wilson")
    assert row == dict(n=5, correct=2, accuracy=0.4, ci_low=lo, ci_high=hi, unparsed=2)


def test_report_is_collected_from_plain_data_and_redrawn_from_results_json(tmp_path):
    files = {}
    for name, pattern in (("base", [1, 0, 0, 1, 0, 0]), ("zero", [1, 0, 0, 1, 0, 1]), ("trained", [1, 1, 1, 1, 0, 1])):
        files[name] = tmp_path / f"{name}.jsonl"
        write_records(files[name], [rec(i, bool(c), True) for i, c in enumerate(pattern)])
    analysis = {"eval": "e", "baseline": "base", "trained": "trained", "zero_control": "zero"}
    timeline = [{"step": "eval-e-base", "kind": "eval", "cached": False, "seconds": 1.0, "rank": 0}]
    results = collect(
        name="plain",
        spec_path="spec.toml",
        analysis=analysis,
        record_paths={"e": files},
        identity={},
        noise={},
        timeline=timeline,
    )
    assert results["conditions"]["trained"]["e"]["correct"] == 5
    assert results["comparisons"]["e"]["trained"]["vs_zero_control"]["fixed"] == 2
    assert "e" in results["decomposition"] and results["verdict"] is None and results["analysis"] == analysis
    out = tmp_path / "out"
    out.mkdir()
    write_outputs(results, out)
    # Redrawn elsewhere from the saved JSON alone: the same report, the same plots' files.
    again = tmp_path / "again"
    again.mkdir()
    saved = json.loads((out / "results.json").read_text())
    drawn = write_outputs(saved, again)
    figures = [f for f in drawn if f.suffix == ".png"]
    assert (again / "report.md").read_text() == (out / "report.md").read_text()
    assert (again / "report.md").read_text() == render_markdown(saved, again, figures)
    assert (again / "accuracy.png").is_file() and (again / "flips.png").is_file()
    assert json.loads((again / "results.json").read_text()) == saved
