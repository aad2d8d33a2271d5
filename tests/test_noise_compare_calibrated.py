"""``noise_report(..., compare_calibrated=True)``: a fresh/keep-grid report also measures a default calibrated
fuse on its own held-out inputs, and the verdict offers ``--requant calibrated`` only when that measured lower
residual over effect. The oracle is the calibrated report itself (a fuse written to disk and measured)."""

import pytest

from fuse_helpers import make_adapter
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.calibration import BUILTIN_PROMPTS
from reqnoise.noise.report import calibrated_text, noise_report


@pytest.fixture(scope="module")
def adapter(toy_model_dir, tmp_path_factory):
    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("cmp") / "ad", dyadic=False, size=0.05, seed=5)


def test_the_calibrated_alternative_is_the_calibrated_report_on_the_same_inputs(toy_model_dir, adapter):
    fresh = noise_report(toy_model_dir, adapter, compare_calibrated=True, alternatives=False, progress=False)
    cal = noise_report(toy_model_dir, adapter, requant="calibrated", alternatives=False, progress=False)
    alt = fresh["calibrated_alternative"]
    assert fresh["heldout"] == cal["heldout"]  # the same held-out prompts: the default set is mode-independent
    assert alt["calibration"]["sha256"] == cal["calibration"]["sha256"]
    assert alt["median_residual_over_effect"] == pytest.approx(cal["summary"]["median_residual_over_effect"], rel=1e-6)
    assert alt["median_output_cosine"] == pytest.approx(cal["summary"]["median_output_cosine"], rel=1e-6)
    assert alt["fallback_entries"] == cal["calibration"]["fallback_entries"]
    ours, theirs = fresh["summary"]["median_residual_over_effect"], alt["median_residual_over_effect"]
    assert ours != theirs
    said = "--requant calibrated keeps more of its effect" in fresh["verdict"]
    assert said == (theirs < ours), fresh["verdict"]
    assert noise_report(toy_model_dir, adapter, alternatives=False, progress=False)["calibrated_alternative"] is None


def test_the_verdict_offers_calibrated_only_when_it_measured_lower():
    assert calibrated_text(0.9, 0.4) == (
        "; --requant calibrated keeps more of its effect on the held-out inputs (median residual/effect 0.40 vs 0.90)"
    )
    assert "does not keep more of it" in calibrated_text(0.4, 0.9)
    assert "does not keep more of it" in calibrated_text(0.5, 0.5)
    close = calibrated_text(0.5, 0.499)
    assert "keeps more" in close and "0.499 vs 0.500" in close
    assert calibrated_text(None, 0.4) == calibrated_text(0.4, None) == ""


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(outputs=False), "needs the output measures"),
        (dict(requant="calibrated"), "already --requant calibrated"),
        (dict(prompts=[BUILTIN_PROMPTS[2], "Name a colour."]), "held-out example 1 of prompts overlaps calibration"),
    ],
)
def test_a_comparison_that_cannot_be_made_is_refused_before_any_model_runs(
    toy_model_dir, adapter, monkeypatch, kw, match
):
    from reqnoise.noise import report

    def no_model(*a, **k):
        raise AssertionError("a model ran")

    monkeypatch.setattr(report, "collect_inputs", no_model)
    with pytest.raises(ReqnoiseError, match=match):
        noise_report(toy_model_dir, adapter, compare_calibrated=True, progress=False, **kw)


def test_the_cli_flag_asks_for_the_comparison(monkeypatch, tmp_path):
    import reqnoise.noise.report as report
    from reqnoise.cli import main

    seen = {}

    def fake(model, adapter_path, **kw):
        seen.update(kw)
        raise SystemExit(0)  # the arguments are all this test reads

    monkeypatch.setattr(report, "noise_report", fake)
    with pytest.raises(SystemExit):
        main(["noise", "--model", str(tmp_path), "--adapter-path", str(tmp_path), "--compare-calibrated"])
    assert seen["compare_calibrated"] is True
    seen.clear()
    with pytest.raises(SystemExit):
        main(["noise", "--model", str(tmp_path), "--adapter-path", str(tmp_path)])
    assert seen["compare_calibrated"] is False
