"""Results of an experiment run: ``results.json``, ``report.md`` and PNG plots.

Plain data in, files out: ``collect`` builds the results dict from records and summaries, ``write_outputs``
draws everything from that dict alone, so a report can be redrawn from a saved ``results.json``.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from reqnoise import atomic
from reqnoise.eval.records import read_records
from reqnoise.experiment.figures import draw_figures
from reqnoise.experiment.spec import analysis_pair
from reqnoise.stats.formatting import pct
from reqnoise.stats.inference import MARGIN, compare, decompose, equivalence, render_decomposition, wilson_ci


def accuracy_row(records) -> dict:
    """n, correct, accuracy (fraction, None for no records), its 95% Wilson interval and the unparsed count.
    An unparsed answer is wrong, whatever its ``correct`` field says (the convention everywhere in reqnoise)."""
    n = len(records)
    k = sum(1 for r in records if r["correct"] and r["parsed"])
    lo, hi = wilson_ci(k, n)
    acc = k / n if n else None
    if acc is not None:  # statsmodels' bounds can miss the estimate by a rounding error at k = 0 or n
        lo, hi = min(lo, acc), max(hi, acc)
    return dict(
        n=n, correct=k, accuracy=acc, ci_low=lo, ci_high=hi, unparsed=sum(1 for r in records if not r["parsed"])
    )


def _comparison_dict(c, margin=None):
    """A comparison as results.json holds it; with ``margin``, plus its ``equivalence`` (verdict, TOST and
    95% intervals) so the text, the report and the figures use one classification."""
    d = c.to_dict()
    if margin is not None:
        d["equivalence"] = asdict(equivalence(c, margin))
    return json.loads(json.dumps(d, default=str))


def verdict_dict(v) -> dict:
    """A ``reqnoise.stats.prereg.Verdict`` as stored in ``results.json``."""
    return dict(met=v.met, text=v.text, numbers=v.numbers, preregistered=v.preregistered, provenance=v.provenance)


def collect(*, name, spec_path, analysis, record_paths, identity, noise, timeline, verdict=None, probe=None) -> dict:
    """The results dict of a run.

    ``record_paths``: eval -> condition -> records file; ``analysis``: the spec's [analysis] table (or None);
    ``identity`` / ``noise``: condition -> step summary; ``timeline``: one dict per step (``plan.execute``);
    ``verdict``: ``verdict_dict`` of the locked criteria, or None; ``probe``: the [probe] step's summary
    (``Runner.probe_summary``), or None."""
    recs = {ev: {m: read_records(p) for m, p in by_model.items()} for ev, by_model in record_paths.items()}
    results = dict(
        name=name,
        spec=str(spec_path),
        conditions={},
        comparisons={},
        decomposition={},
        noise=noise,
        identity=identity,
        verdict=verdict,
        steps=timeline,
        analysis=analysis,
    )
    if probe is not None:  # only when the spec has [probe]: other runs keep their results.json as it was
        results["probe"] = probe
    for ev, by_model in recs.items():
        for m, r in by_model.items():
            results["conditions"].setdefault(m, {})[ev] = accuracy_row(r)
    a = analysis
    if a:
        # The main (trained, zero control) pair with its random band, then the pairs.
        main = analysis_pair(
            {k: a[k] for k in ("trained", "zero_control", "random_controls", "trained_controls") if k in a}
        )
        pairs = [main] + [analysis_pair(p) for p in a.get("pairs", [])]
        margin = a.get("margin", MARGIN)
        results["margin"] = margin
        # vs_<control> rows: each adapter against every control named for it (random deltas and trained controls;
        # a pair's own zero control). The main adapter's zero control is its vs_zero_control row.
        named = [(main["trained"], main["random_controls"] + main["trained_controls"])] + [
            (p["trained"], [p["zero_control"]] + p["random_controls"] + p["trained_controls"]) for p in pairs[1:]
        ]
        for ev, by_model in recs.items():
            ref = by_model.get(a["zero_control"])
            base = by_model.get(a["baseline"])
            rows = {}
            for m, r in by_model.items():
                row = {}
                if base is not None and m != a["baseline"]:
                    row["vs_baseline"] = _comparison_dict(compare(base, r), margin)
                if ref is not None and m != a["zero_control"]:
                    row["vs_zero_control"] = _comparison_dict(compare(ref, r), margin)
                rows[m] = row
            for trained, controls in named:
                for c in controls:
                    if trained in rows and c in by_model:
                        rows[trained][f"vs_{c}"] = _comparison_dict(compare(by_model[c], by_model[trained]), margin)
            results["comparisons"][ev] = rows
            for p in pairs:
                trained, zero, randoms = p["trained"], p["zero_control"], p["random_controls"]
                if all(x in by_model for x in (a["baseline"], trained, zero)):
                    dec = decompose(
                        by_model[a["baseline"]],
                        by_model[trained],
                        by_model[zero],
                        [by_model[x] for x in randoms if x in by_model],
                    )
                    key = ev if trained == a["trained"] else f"{ev} ({trained} vs {zero})"
                    results["decomposition"][key] = _comparison_dict(dec)
                    results["decomposition"][key]["table"] = render_decomposition(dec)
    return results


def _ci_cells(c) -> str:
    eq = c.get("equivalence")
    ci = c.get("difference_ci")
    cell = "-" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] pp"
    return f"{cell} | {eq['verdict'] if eq else '-'}"


def render_markdown(results, out, figures=()) -> str:
    """``report.md`` from the results dict; ``out``: the run's directory (where the step outputs are);
    ``figures``: the PNG files drawn beside it (``figures.draw_figures``), linked where they belong."""
    drawn = {Path(f).name for f in figures}
    lines = [f"# {results['name']}", ""]
    if results.get("verdict"):
        v = results["verdict"]
        post_hoc = v.get("preregistered") is False
        lines += [
            "## Verdict",
            "",
            f"**{'kill criterion met' if v['met'] else 'kill criterion not met'}**"
            + (" (post hoc: the criteria were NOT pre-registered for these results)" if post_hoc else ""),
            "",
            "```",
            v["text"].strip(),
            "```",
            "",
        ]
    if "forest.png" in drawn:
        margin = results.get("margin", MARGIN)
        lines += [
            "## Paired differences against every control",
            "",
            f"95% paired CIs; equivalent = the 90% CI inside the ±{100 * margin:g} pp margin (TOST), effect = the "
            "95% CI excludes 0, else inconclusive.",
            "",
            "![forest](forest.png)",
            "",
        ]
    lines += ["## Accuracy per condition", ""] + (["![accuracy](accuracy.png)", ""] if "accuracy.png" in drawn else [])
    evals = sorted({ev for c in results["conditions"].values() for ev in c})
    lines.append("| condition | " + " | ".join(evals) + (" | identity |" if results["identity"] else " |"))
    lines.append("|---" * (len(evals) + 1 + bool(results["identity"])) + "|")
    for c, row in results["conditions"].items():
        cells = []
        for ev in evals:
            r = row.get(ev)
            cells.append("-" if not r else f"{pct(r['accuracy'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] n={r['n']}")
        ident = results["identity"].get(c)
        if results["identity"]:
            cells.append("-" if not ident else f"{ident.get('score')}/{ident.get('n')}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("")
    for ev, dec in results["decomposition"].items():
        lines += [f"## Decomposition on `{ev}`", "", dec["table"], ""]
    controls = [
        k
        for by in results["comparisons"].values()
        for r in by.values()
        for k in r
        if k.startswith("vs_") and k not in ("vs_baseline", "vs_zero_control")
    ]
    if controls:
        lines += [
            "## Trained adapters against their own controls",
            "",
            "Each against the controls named for it: its zero delta through the same fuse, and adapters "
            "trained by the same recipe on content-free data (shuffled answers). What it gains beyond "
            "all of them is content.",
            "",
            "| eval | trained | control | difference | 95% CI | class | fixed / broken | McNemar p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for ev, by in results["comparisons"].items():
            for m, r in by.items():
                for k in sorted(x for x in r if x in controls):
                    c = r[k]
                    lines.append(
                        f"| {ev} | {m} | {k[3:]} | {100 * c['difference']:+.1f} pp | {_ci_cells(c)} | "
                        f"{c['fixed']} / {c['broken']} | {c['mcnemar_p']:.2g} |"
                    )
        lines.append("")
    if "flips.png" in drawn:
        lines += ["## Flips against the zero-delta control", "", "![flips](flips.png)", ""]
    if results["noise"]:
        lines += ["## Does the adapter survive the fuse?", ""]
        for m, n in results["noise"].items():
            lines.append(f"- **{m}**: {n['verdict']}")
            if f"survival-{m}.png" in drawn:
                lines.append(f"  ![survival {m}](survival-{m}.png)")
            elif (Path(out) / "steps" / f"noise-{m}" / "noise.png").is_file():
                lines.append(f"  ![noise {m}](steps/noise-{m}/noise.png)")
        lines.append("")
    if results.get("probe"):
        lines += _probe_lines(results["probe"], "probe.png" in drawn)
    lines += ["## Steps", "", "| step | cached | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {'yes' if s['cached'] else 'no'} | {s['seconds']} |" for s in results["steps"]]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _probe_lines(probe, plotted: bool) -> list:
    lines = [
        "## Representation probe",
        "",
        "Per layer: the persona centroid's shift from model A to model B over A's within-model spread; with "
        "contrast prompts, the cosine of the two persona directions and the accuracy on B of the "
        "difference-of-means probe fit on A (permutation p-value). See `reqnoise.eval.probe`.",
        "",
    ]
    if plotted:
        lines += ["![probe](probe.png)", ""]
    lines += [
        "| A | B | place | layer | shift / spread | cosine | probe acc on B | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in probe["pairs"]:
        for place in probe["places"]:
            for r in pair.get(place, []):
                lines.append(
                    f"| {pair['a']} | {pair['b']} | {place} | {r['layer']} | {_num(r.get('shift'))} | "
                    f"{_num(r.get('cosine'))} | {_num(r.get('probe_acc_b'))} | {_num(r.get('probe_p_b'))} |"
                )
    return lines + [""]


def write_report(results, out, *, base_dir=None) -> list:
    """Draw every figure of ``results`` and ``report.md`` into ``out`` (``base_dir``: the run directory whose
    ``steps/`` hold the noise reports, default ``out``). Needs nothing but the results dict; returns the paths."""
    out = Path(out)
    base_dir = Path(base_dir or out)
    written = draw_figures(results, out, base_dir=base_dir)
    plot = results.get("probe", {}).get("plot") if results.get("probe") else None
    if plot and (base_dir / plot).is_file():
        # Beside report.md like every figure, so the report's directory holds all it links.
        if (base_dir / plot).resolve() != (out / "probe.png").resolve():
            with (
                open(base_dir / plot, "rb") as fin,
                atomic.atomic_file(out / "probe.png", overwrite=True, mode="wb") as f,
            ):
                shutil.copyfileobj(fin, f)
        written = [*written, out / "probe.png"]
    atomic.write_text(out / "report.md", render_markdown(results, base_dir, written), overwrite=True)
    return [*written, out / "report.md"]


def write_outputs(results, out) -> list:
    """Write ``results.json``, the figures and ``report.md`` of a results dict into the run directory ``out``."""
    out = Path(out)
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n", overwrite=True)
    return [out / "results.json", *write_report(results, out)]
