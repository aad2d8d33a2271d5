"""Results of an experiment run: ``results.json``, ``report.md`` and PNG plots.

Plain data in, files out: ``collect`` builds the results dict from records and summaries, ``write_outputs``
draws everything from that dict alone, so a report can be redrawn from a saved ``results.json``.
"""

import json
from pathlib import Path

import numpy as np

from reqnoise import atomic
from reqnoise.eval.records import read_records
from reqnoise.experiment.spec import analysis_pair
from reqnoise.stats.formatting import pct
from reqnoise.stats.inference import compare, decompose, render_decomposition, wilson_ci


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


def _comparison_dict(c):
    return json.loads(json.dumps(c.to_dict(), default=str))


def verdict_dict(v) -> dict:
    """A ``reqnoise.stats.prereg.Verdict`` as stored in ``results.json``."""
    return dict(met=v.met, text=v.text, numbers=v.numbers, preregistered=v.preregistered, provenance=v.provenance)


def collect(*, name, spec_path, analysis, record_paths, identity, noise, timeline, verdict=None) -> dict:
    """The results dict of a run.

    ``record_paths``: eval -> condition -> records file; ``analysis``: the spec's [analysis] table (or None);
    ``identity`` / ``noise``: condition -> step summary; ``timeline``: one dict per step (``plan.execute``);
    ``verdict``: ``verdict_dict`` of the locked criteria, or None."""
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
        # vs_<control> rows: each adapter against the controls named for it. The main adapter's zero control has
        # its vs_zero_control row; a pair given as a table is a second adapter with its own zero control.
        named = [(main["trained"], main["trained_controls"])] + [
            (p["trained"], [p["zero_control"]] + p["trained_controls"])
            for raw, p in zip(a.get("pairs", []), pairs[1:])
            if isinstance(raw, dict)
        ]
        for ev, by_model in recs.items():
            ref = by_model.get(a["zero_control"])
            base = by_model.get(a["baseline"])
            rows = {}
            for m, r in by_model.items():
                row = {}
                if base is not None and m != a["baseline"]:
                    row["vs_baseline"] = _comparison_dict(compare(base, r))
                if ref is not None and m != a["zero_control"]:
                    row["vs_zero_control"] = _comparison_dict(compare(ref, r))
                rows[m] = row
            for trained, controls in named:
                for c in controls:
                    if trained in rows and c in by_model:
                        rows[trained][f"vs_{c}"] = _comparison_dict(compare(by_model[c], by_model[trained]))
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


def plot_accuracy(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(results["conditions"])
    evals = sorted({ev for c in results["conditions"].values() for ev in c})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(conds) * max(1, len(evals))), 4))
    width = 0.8 / max(1, len(evals))
    for j, ev in enumerate(evals):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(conds):
            row = results["conditions"][c].get(ev)
            if row:
                xs.append(i + j * width)
                ys.append(100 * row["accuracy"])
                # Wilson bounds at 0 or 1 can sit a rounding error on the wrong side of the estimate.
                lo.append(max(0.0, 100 * (row["accuracy"] - row["ci_low"])))
                hi.append(max(0.0, 100 * (row["ci_high"] - row["accuracy"])))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=ev)
    ax.set_xticks(np.arange(len(conds)) + width * (len(evals) - 1) / 2)
    ax.set_xticklabels(conds, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%), 95% Wilson CI")
    ax.legend(fontsize=8)
    ax.set_title("accuracy per condition")
    fig.tight_layout()
    with atomic.atomic_file(path, overwrite=True, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def plot_flips(results, path, zero_control):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for ev, by in results["comparisons"].items():
        for m, r in by.items():
            if "vs_zero_control" in r:
                f = r["vs_zero_control"]
                rows.append((f"{m}\n{ev}", f["fixed"], f["broken"]))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="fixed (wrong -> right)", color="tab:green")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="broken (right -> wrong)", color="tab:red")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], fontsize=7)
    ax.set_ylabel("items")
    ax.set_title(f"flips against the zero-delta control ({zero_control})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_file(path, overwrite=True, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def render_markdown(results, out) -> str:
    """``report.md`` from the results dict; ``out``: the run's directory (where the noise plots are)."""
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
    lines += ["## Accuracy per condition", "", "![accuracy](accuracy.png)", ""]
    evals = sorted({ev for c in results["conditions"].values() for ev in c})
    lines.append("| condition | " + " | ".join(evals) + (" | identity |" if results["identity"] else " |"))
    lines.append("|---" * (len(evals) + 1 + bool(results["identity"])) + "|")
    for c, row in results["conditions"].items():
        cells = []
        for ev in evals:
            r = row.get(ev)
            cells.append(
                "-" if not r else f"{pct(r['accuracy'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] n={r['n']}"
            )
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
            "| eval | trained | control | difference | fixed / broken | McNemar p |",
            "|---|---|---|---|---|---|",
        ]
        for ev, by in results["comparisons"].items():
            for m, r in by.items():
                for k in sorted(x for x in r if x in controls):
                    c = r[k]
                    lines.append(
                        f"| {ev} | {m} | {k[3:]} | {100 * c['difference']:+.1f} pp | "
                        f"{c['fixed']} / {c['broken']} | {c['mcnemar_p']:.2g} |"
                    )
        lines.append("")
    if results["comparisons"]:
        lines += ["## Flips against the zero-delta control", "", "![flips](flips.png)", ""]
    if results["noise"]:
        lines += ["## Does the adapter survive the fuse?", ""]
        for m, n in results["noise"].items():
            lines.append(f"- **{m}**: {n['verdict']}")
            if (Path(out) / "steps" / f"noise-{m}" / "noise.png").is_file():
                lines.append(f"  ![noise {m}](steps/noise-{m}/noise.png)")
        lines.append("")
    lines += ["## Steps", "", "| step | cached | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {'yes' if s['cached'] else 'no'} | {s['seconds']} |" for s in results["steps"]]
    return "\n".join(lines) + "\n"


def write_outputs(results, out) -> None:
    """Write ``results.json``, ``report.md`` and the plots of a results dict into the run directory ``out``."""
    out = Path(out)
    plot_accuracy(results, out / "accuracy.png")
    if results.get("analysis"):
        plot_flips(results, out / "flips.png", results["analysis"]["zero_control"])
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n", overwrite=True)
    atomic.write_text(out / "report.md", render_markdown(results, out), overwrite=True)
