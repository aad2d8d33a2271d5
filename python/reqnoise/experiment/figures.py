"""The figures of an experiment, drawn from ``results.json`` alone (plus the step noise reports when present).

* ``forest.png``: per evaluation, the paired difference (trained - control, percentage points) with its 95% CI
  for every comparison the analysis names, the zero line, the equivalence margin and the random-delta band;
* ``accuracy.png``: accuracy with Wilson intervals, one panel per evaluation, conditions grouped by role;
* ``flips.png``: items fixed / broken against the zero-delta control, one diverging bar per condition;
* ``survival-<condition>.png``: layer x expert heatmaps of delta cosine and codes changed, per module type.

Output is deterministic: matplotlib's Agg renderer with its bundled DejaVu Sans, fixed figure sizes (no
tight bounding box), and no ``Software`` entry in the PNG metadata (matplotlib writes no timestamp to PNGs),
so the same results give the same bytes on the same matplotlib. Colours are the Okabe-Ito palette and the
viridis / cividis colour maps, all readable with the common colour-vision deficiencies.
"""

import json
import math
import re
from pathlib import Path

from reqnoise import atomic
from reqnoise.experiment.spec import analysis_pair
from reqnoise.stats.inference import MARGIN, classify_interval

DPI = 100  # pixels per inch of every figure; widths below stay <= 16 in, i.e. <= 1600 px
MAX_WIDTH_IN = 16.0
MIN_FONT_PT = 8

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "grey": "#999999",
}
CLASS_COLOURS = {
    "effect": OKABE_ITO["blue"],
    "equivalent": OKABE_ITO["green"],
    "inconclusive": OKABE_ITO["orange"],
    None: OKABE_ITO["grey"],
}
GROUP_ORDER = ("baseline", "study arm", "positive control", "controls", "other")
GROUP_COLOURS = {
    "baseline": OKABE_ITO["black"],
    "study arm": OKABE_ITO["blue"],
    "positive control": OKABE_ITO["purple"],
    "controls": OKABE_ITO["orange"],
    "other": OKABE_ITO["grey"],
}

STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.interpolation": "nearest",
}

ROLE_KEYS = ("baseline", "trained", "zero_control", "random_controls", "trained_controls", "pairs")


# ----------------------------------------------------------------------------------------------------------------
# Classification and roles


def row_class(comparison: dict, margin: float) -> str | None:
    """The comparison's class, from the one rule (``stats.inference.classify_interval``): its stored
    ``equivalence`` when the report computed one (TOST interval and 95% CI), else its ``difference_ci`` used for
    both; None without an interval."""
    eq = comparison.get("equivalence")
    if eq:
        return classify_interval(eq["tost_ci"], eq["ci"], margin)
    ci = comparison.get("difference_ci")
    return None if ci is None else classify_interval(ci, ci, margin)


def margin_of(results: dict) -> float:
    """The equivalence margin (fraction): ``results["margin"]`` when present, else 5 pp."""
    m = results.get("margin")
    return MARGIN if m is None else float(m)


def _normalise_pair(pair) -> dict:

    return analysis_pair(pair)


def _spec_tables(results: dict, base_dir) -> dict:
    """The spec TOML as a dict: the file named in results["spec"], else one of that name next to results.json;
    {} when neither exists or parses."""
    import tomllib

    name = results.get("spec")
    if not name:
        return {}
    candidates = [Path(name)]
    if base_dir is not None:
        candidates.append(Path(base_dir) / Path(name).name)
    for p in candidates:
        if p.is_file():
            try:
                return tomllib.loads(p.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                continue
    return {}


def _infer_roles(results: dict) -> dict:
    """Roles read back from the structure ``collect`` gives results.json: the baseline is the condition every
    other compared condition has a vs_baseline row against, the zero control the one without vs_zero_control,
    the extra pairs are named in the decomposition keys "<eval> (<trained> vs <zero>)", and the main trained
    adapter is the one with the most vs_<control> rows (ties: first in results order). Random controls cannot
    be told from their rows; the random band still comes from the decomposition."""
    comps = results.get("comparisons") or {}
    conds = list(results.get("conditions") or {})
    has = {c: set() for c in conds}
    for by in comps.values():
        for c, row in by.items():
            has.setdefault(c, set()).update(row)
    compared = [c for c in has if has[c]]
    no_base = [c for c in compared if "vs_baseline" not in has[c]]
    baseline = no_base[0] if len(no_base) == 1 else None
    no_zero = [c for c in compared if "vs_zero_control" not in has[c] and c != baseline]
    zero = no_zero[0] if len(no_zero) == 1 else None
    pairs = []
    for key in results.get("decomposition") or {}:
        m = re.fullmatch(r".* \((.+) vs (.+)\)", key)
        if m and list(m.groups()) not in [[p["trained"], p["zero_control"]] for p in pairs]:
            pairs.append(_normalise_pair(list(m.groups())))
    in_pairs = {p["trained"] for p in pairs}
    extra = {c: sorted(k[3:] for k in has[c] if k not in ("vs_baseline", "vs_zero_control")) for c in compared}
    trained_controls = {}
    for c, ks in extra.items():
        trained_controls[c] = ks
        for p in pairs:
            if p["trained"] == c:
                p["trained_controls"] = [k for k in ks if k != p["zero_control"]]
    cands = [c for c in compared if c not in in_pairs and c not in (baseline, zero)]
    trained = max(cands, key=lambda c: len(extra[c]), default=None) if cands else None
    if trained is not None and not extra[trained] and len(cands) > 1:
        trained = None  # nothing tells the study arm from the other adapters
    return dict(
        baseline=baseline,
        trained=trained,
        zero_control=zero,
        random_controls=[],
        trained_controls=trained_controls.get(trained, []) if trained else [],
        pairs=pairs,
    )


def analysis_roles(results: dict, base_dir=None) -> dict:
    """Who is who: {baseline, trained, zero_control, random_controls, trained_controls, pairs (normalised),
    adapter (condition -> adapter name, {} unknown), requant (condition -> mode, {} unknown), source}.

    Read from ``results["analysis"]`` when the report writes it there, else from the ``[analysis]`` table of
    the spec file named in ``results["spec"]`` (or a file of that name in ``base_dir``), else inferred from
    the comparison rows (``source`` says which)."""
    spec = _spec_tables(results, base_dir)
    if isinstance(results.get("analysis"), dict) and results["analysis"]:
        a, source = results["analysis"], "results"
    elif spec.get("analysis"):
        a, source = spec["analysis"], "spec"
    else:
        a, source = _infer_roles(results), "inferred"
    roles = {k: a.get(k) for k in ROLE_KEYS}
    roles["random_controls"] = list(roles["random_controls"] or [])
    roles["trained_controls"] = list(roles["trained_controls"] or [])
    roles["pairs"] = [_normalise_pair(p) for p in roles["pairs"] or []]
    models = spec.get("models") or {}
    roles["adapter"] = {c: m.get("adapter") for c, m in models.items() if isinstance(m, dict) and m.get("adapter")}
    roles["requant"] = {c: m.get("requant") for c, m in models.items() if isinstance(m, dict) and m.get("requant")}
    roles["source"] = source
    return roles


def _groups(roles: dict) -> list:
    """[(trained, zero_control, random_controls, trained_controls, decomposition key suffix)] for the main
    adapter then each pair; the suffix is "" for the main one and " (T vs Z)" for a pair, as ``collect`` keys
    the decomposition."""
    out = []
    if roles.get("trained"):
        out.append((roles["trained"], roles["zero_control"], roles["random_controls"], roles["trained_controls"], ""))
    for p in roles["pairs"]:
        if p["trained"]:
            suffix = f" ({p['trained']} vs {p['zero_control']})"
            out.append((p["trained"], p["zero_control"], p["random_controls"], p["trained_controls"], suffix))
    return out


def condition_groups(results: dict, roles: dict) -> list:
    """[(group, [condition, ...])] in GROUP_ORDER, empty groups left out, conditions in results order.

    baseline: the analysis baseline; study arm: the main trained adapter and each pair's trained adapter built
    from the same adapter (all pairs when the adapters are unknown); positive control: a pair's trained adapter
    built from a different adapter; controls: zero-delta, random-delta and trained (e.g. shuffled-answer)
    controls; other: everything else (e.g. the models upstream of the baseline)."""
    role = {}
    if roles.get("baseline"):
        role[roles["baseline"]] = "baseline"
    main_adapter = roles["adapter"].get(roles.get("trained"))
    for _t, z, rs, ts, _ in _groups(roles):
        for c in [z, *rs, *ts]:
            if c:
                role.setdefault(c, "controls")
    for t, *_ in _groups(roles):
        a = roles["adapter"].get(t)
        same = t == roles.get("trained") or main_adapter is None or a is None or a == main_adapter
        role.setdefault(t, "study arm" if same else "positive control")
    conds = list(results.get("conditions") or {})
    groups = [(g, [c for c in conds if role.get(c, "other") == g]) for g in GROUP_ORDER]
    return [(g, cs) for g, cs in groups if cs]


def _comparison(results, ev, trained, control, roles) -> dict | None:
    row = (results.get("comparisons") or {}).get(ev, {}).get(trained) or {}
    if f"vs_{control}" in row:
        return row[f"vs_{control}"]
    if control == roles.get("zero_control") and "vs_zero_control" in row:
        return row["vs_zero_control"]
    return None


def forest_rows(results: dict, roles: dict | None = None) -> dict:
    """{eval: [row]} for the forest plot, each row a dict: label, trained, control, kind ("zero delta",
    "random delta", "trained control"), n (paired items), difference (fraction, B - A = trained - control), ci ([lo, hi]
    fractions, or None when the comparison carries no ``difference_ci``), cls (``row_class`` against the
    margin; None without a CI), band ([min, max] of random - zero_control from the decomposition, on the zero
    delta row only, else None). Comparisons that results.json does not hold are left out."""
    roles = roles or analysis_roles(results)
    margin = margin_of(results)
    out = {}
    for ev in results.get("comparisons") or {}:
        rows = []
        for t, z, rs, ts, suffix in _groups(roles):
            dec = (results.get("decomposition") or {}).get(ev + suffix) or {}
            effects = [e for e in dec.get("random_effects") or [] if e is not None]
            for kind, controls in (("zero delta", [z]), ("random delta", rs), ("trained control", ts)):
                for c in controls:
                    cmp = _comparison(results, ev, t, c, roles) if c else None
                    if cmp is None:
                        continue
                    ci = cmp.get("difference_ci")
                    ci = [float(ci[0]), float(ci[1])] if ci is not None else None
                    rows.append(
                        dict(
                            label=f"{t} \u2212 {c}  ({kind})",
                            trained=t,
                            control=c,
                            kind=kind,
                            n=cmp.get("n"),
                            difference=float(cmp["difference"]),
                            ci=ci,
                            cls=row_class(cmp, margin),
                            band=[min(effects), max(effects)] if effects and kind == "zero delta" else None,
                        )
                    )
        if rows:
            out[ev] = rows
    return out


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width_in, MAX_WIDTH_IN), height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic.atomic_file(path, overwrite=True, mode="wb") as fh:
        # No Software entry: the bytes then depend on the drawing, not on the matplotlib version string.
        fig.savefig(fh, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _style():
    import matplotlib

    return matplotlib.rc_context(STYLE)


def _evals(results) -> list:
    """Evaluations in first-seen order over the conditions (the order the spec lists them in)."""
    out = []
    for row in (results.get("conditions") or {}).values():
        out += [ev for ev in row if ev not in out]
    return out


def _grid(n: int, max_cols: int = 4) -> tuple:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def _forest_text(row) -> str:
    d = f"{100 * row['difference']:+.1f}"
    if row["ci"] is None:
        return f"{d} pp, no CI"
    lo, hi = (100 * x for x in row["ci"])
    return f"{d} [{lo:+.1f}, {hi:+.1f}] {row['cls']}"


def build_forest(results: dict, roles: dict | None = None):
    """The forest plot as a matplotlib Figure, or None when results hold no comparison to show."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    roles = roles or analysis_roles(results)
    by_ev = forest_rows(results, roles)
    if not by_ev:
        return None
    margin = 100 * margin_of(results)
    evs = list(by_ev)
    with _style():
        fig = _new_figure(10.0, sum(0.32 * len(by_ev[e]) + 0.9 for e in evs) + 1.3)
        axes = fig.subplots(len(evs), 1, sharex=True, squeeze=False, height_ratios=[len(by_ev[e]) + 2 for e in evs])
        span = [margin]
        for rows in by_ev.values():
            for r in rows:
                span += [abs(100 * r["difference"])] + [abs(100 * x) for x in (r["ci"] or []) + (r["band"] or [])]
        lim = 1.1 * max(span)
        for ax, ev in zip(axes[:, 0], evs):
            rows = by_ev[ev]
            ys = list(range(len(rows)))[::-1]
            ax.axvspan(-margin, margin, color="#DDDDDD", zorder=0)
            ax.axvline(0, color=OKABE_ITO["black"], lw=0.8, zorder=1)
            for y, r in zip(ys, rows):
                colour = CLASS_COLOURS[r["cls"]]
                if r["band"]:
                    lo, hi = (100 * x for x in r["band"])
                    ax.fill_between(
                        [lo, hi] if hi > lo else [lo - 0.15, hi + 0.15],
                        y - 0.38,
                        y + 0.38,
                        color=OKABE_ITO["sky"],
                        alpha=0.45,
                        lw=0,
                        zorder=1,
                    )
                if r["ci"]:
                    ax.plot([100 * r["ci"][0], 100 * r["ci"][1]], [y, y], color=colour, lw=2.2, zorder=2)
                ax.plot(
                    100 * r["difference"],
                    y,
                    marker="o" if r["ci"] else "D",
                    ms=6,
                    color=colour,
                    mfc=colour if r["ci"] else "white",
                    zorder=3,
                )
            ax.set_yticks(ys, [r["label"] for r in rows])
            ax.set_ylim(-0.7, len(rows) - 0.3)
            # The numbers beside each row, as a forest plot's right-hand column: twinx, so that the constrained
            # layout makes room for them.
            right = ax.twinx()
            right.set_ylim(ax.get_ylim())
            right.set_yticks(ys, [_forest_text(r) for r in rows])
            right.tick_params(length=0)
            right.spines[["top", "right", "left", "bottom"]].set_visible(False)
            n = {r["n"] for r in rows}
            ax.set_title(f"{ev}" + (f"  (n = {n.pop()} paired items)" if len(n) == 1 else ""), loc="left")
            ax.set_xlim(-lim, lim)
            ax.grid(axis="x", color="#EEEEEE", lw=0.6, zorder=0)
        axes[-1, 0].set_xlabel("paired difference, trained \u2212 control (percentage points), 95% CI")
        handles = [
            Line2D([], [], color=CLASS_COLOURS[c], marker="o", lw=2.2, label=c)
            for c in ("effect", "equivalent", "inconclusive")
        ]
        if any(r["ci"] is None for rows in by_ev.values() for r in rows):
            handles.append(
                Line2D([], [], color=OKABE_ITO["grey"], marker="D", mfc="white", lw=0, label="no CI in results")
            )
        handles.append(Patch(color="#DDDDDD", label=f"equivalence margin \u00b1{margin:g} pp"))
        if any(r["band"] for rows in by_ev.values() for r in rows):
            handles.append(Patch(color=OKABE_ITO["sky"], alpha=0.45, label="random-delta band (random \u2212 zero)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
        fig.suptitle("Trained adapter against each control", x=0.01, ha="left")
    return fig


def plot_forest(results: dict, path, roles: dict | None = None) -> Path | None:
    """Write the forest plot (PNG) to ``path``; returns the path, or None when there is nothing to draw."""
    with _style():
        fig = build_forest(results, roles)
        return None if fig is None else _save(fig, path)


def _condition_axis(ax, groups, order):
    """Conditions on y (top to bottom in ``order``), with a thin rule between role groups."""
    ys = {c: len(order) - 1 - i for i, c in enumerate(order)}
    ax.set_yticks([ys[c] for c in order], order)
    ax.set_ylim(-0.6, len(order) - 0.4)
    seen = 0
    for _, cs in groups[:-1]:
        seen += len(cs)
        ax.axhline(len(order) - seen - 0.5, color="#BBBBBB", lw=0.6)
    return ys


def build_accuracy(results: dict, roles: dict | None = None):
    """Accuracy small multiples as a Figure (one panel per evaluation), or None without conditions."""
    from matplotlib.lines import Line2D

    roles = roles or analysis_roles(results)
    groups = condition_groups(results, roles)
    order = [c for _, cs in groups for c in cs]
    evs = _evals(results)
    if not order or not evs:
        return None
    group_of = {c: g for g, cs in groups for c in cs}
    nr, nc = _grid(len(evs))
    with _style():
        fig = _new_figure(1.9 + 3.1 * nc, nr * (0.27 * len(order) + 1.0) + 0.9)
        axes = fig.subplots(nr, nc, sharey=True, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= len(evs):
                ax.set_visible(False)
                continue
            ev = evs[k]
            ys = _condition_axis(ax, groups, order)
            ns = set()
            for c in order:
                row = results["conditions"][c].get(ev)
                if not row or row.get("accuracy") is None:
                    continue
                ns.add(row["n"])
                acc = 100 * row["accuracy"]
                # Wilson bounds at 0 or 1 can sit a rounding error on the wrong side of the estimate.
                err = [[max(0.0, acc - 100 * row["ci_low"])], [max(0.0, 100 * row["ci_high"] - acc)]]
                colour = GROUP_COLOURS[group_of[c]]
                ax.errorbar(acc, ys[c], xerr=err, fmt="o", ms=5, color=colour, elinewidth=1.6, capsize=0)
            ax.set_xlim(-3, 103)
            ax.set_xticks([0, 25, 50, 75, 100])
            ax.grid(axis="x", color="#EEEEEE", lw=0.6, zorder=0)
            ax.set_title(ev + (f"  (n = {ns.pop()})" if len(ns) == 1 else ""))
            ax.set_xlabel("accuracy (%)")
        handles = [Line2D([], [], color=GROUP_COLOURS[g], marker="o", lw=1.6, label=g) for g, _ in groups]
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        fig.suptitle("Accuracy per condition, 95% Wilson interval", x=0.01, ha="left")
    return fig


def plot_accuracy(results: dict, path, roles: dict | None = None) -> Path | None:
    """Write the accuracy small multiples (PNG) to ``path``; returns the path, or None without conditions."""
    with _style():
        fig = build_accuracy(results, roles)
        return None if fig is None else _save(fig, path)


def build_flips(results: dict, roles: dict | None = None):
    """Items fixed (wrong -> right) and broken (right -> wrong) against the zero-delta control as a Figure, one
    panel per evaluation; None when results hold no vs_zero_control comparison."""
    from matplotlib.patches import Patch

    roles = roles or analysis_roles(results)
    comps = results.get("comparisons") or {}
    evs = [ev for ev in comps if any("vs_zero_control" in r for r in comps[ev].values())]
    if not evs:
        return None
    with_row = {c for ev in evs for c, r in comps[ev].items() if "vs_zero_control" in r}
    groups = [(g, [c for c in cs if c in with_row]) for g, cs in condition_groups(results, roles)]
    groups = [(g, cs) for g, cs in groups if cs]
    order = [c for _, cs in groups for c in cs]
    top = max(
        max(r["vs_zero_control"]["fixed"], r["vs_zero_control"]["broken"], 1)
        for c in order
        for ev in evs
        for r in [comps[ev].get(c) or {}]
        if "vs_zero_control" in r
    )
    nr, nc = _grid(len(evs))
    with _style():
        fig = _new_figure(1.9 + 3.1 * nc, nr * (0.27 * len(order) + 1.0) + 0.9)
        axes = fig.subplots(nr, nc, sharey=True, sharex=True, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= len(evs):
                ax.set_visible(False)
                continue
            ev = evs[k]
            ys = _condition_axis(ax, groups, order)
            ns = set()
            for c in order:
                f = (comps[ev].get(c) or {}).get("vs_zero_control")
                if f is None:
                    continue
                ns.add(f["n"])
                ax.barh(ys[c], f["fixed"], height=0.7, color=OKABE_ITO["green"])
                ax.barh(ys[c], -f["broken"], height=0.7, color=OKABE_ITO["vermillion"])
                for v, ha in ((f["fixed"], "left"), (-f["broken"], "right")):
                    if v:
                        ax.text(
                            v + (0.02 if v > 0 else -0.02) * top, ys[c], str(abs(v)), va="center", ha=ha, fontsize=8
                        )
            ax.axvline(0, color=OKABE_ITO["black"], lw=0.8)
            ax.set_xlim(-1.25 * top, 1.25 * top)
            ax.xaxis.set_major_formatter(lambda v, _: f"{abs(v):g}")
            ax.set_title(ev + (f"  (n = {ns.pop()})" if len(ns) == 1 else ""))
            ax.set_xlabel("items: broken | fixed")
        handles = [
            Patch(color=OKABE_ITO["green"], label="fixed (control wrong, condition right)"),
            Patch(color=OKABE_ITO["vermillion"], label="broken (control right, condition wrong)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
        zc = roles.get("zero_control") or "the zero-delta control"
        fig.suptitle(f"Flips against the zero-delta control ({zc})", x=0.01, ha="left")
    return fig


def plot_flips(results: dict, path, roles: dict | None = None) -> Path | None:
    """Write the flip chart (PNG) to ``path``; returns the path, or None when there is nothing to draw."""
    with _style():
        fig = build_flips(results, roles)
        return None if fig is None else _save(fig, path)


def noise_modules(results: dict, condition: str, base_dir=None) -> list | None:
    """Per-(module, expert) rows of a condition's noise report: ``results["noise"][cond]["modules"]`` when the
    results carry them, else ``<base_dir>/steps/noise-<cond>/noise.json``; None when neither exists."""
    rows = ((results.get("noise") or {}).get(condition) or {}).get("modules")
    if rows is not None:
        return rows
    if base_dir is None:
        return None
    p = Path(base_dir) / "steps" / f"noise-{condition}" / "noise.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text()).get("modules")


def _module_type(name: str) -> str:
    """ "model.layers.3.mlp.switch_mlp.down_proj" -> "mlp.down_proj": the path without the layer index and the
    stacked-expert container, so every layer's copy of a module falls in one type."""
    parts = re.sub(r"^(model\.)?layers\.\d+\.", "", name).split(".")
    return ".".join(p for p in parts if p not in ("switch_mlp", "experts"))


def _survival_panels(modules: list) -> list:
    """[(title, layers, column labels, cosine grid, codes grid)]: one panel pair per stacked (per-expert) module
    type with experts as columns, and one for all dense module types with the module type as column. Cells no
    row fills are NaN."""
    import numpy as np

    layers = sorted({-1 if r.get("layer") is None else r["layer"] for r in modules})
    li = {layer: i for i, layer in enumerate(layers)}
    types = sorted({_module_type(r["module"]) for r in modules})
    stacked = sorted({_module_type(r["module"]) for r in modules if r.get("expert") is not None})
    dense = [t for t in types if t not in stacked]
    short = [t.split(".")[-1] for t in dense]
    dense_labels = short if len(set(short)) == len(short) else dense
    panels = []
    for t in stacked:
        n_exp = max((r.get("expert") or 0) + 1 for r in modules if _module_type(r["module"]) == t)
        panels.append((t, [str(e) for e in range(n_exp)], lambda r, t=t: r.get("expert") or 0, {t}))
    if dense:
        panels.append(("dense modules", dense_labels, lambda r: dense.index(_module_type(r["module"])), set(dense)))
    out = []
    for title, cols, col_of, members in panels:
        cos = np.full((len(layers), len(cols)), np.nan)
        codes = np.full((len(layers), len(cols)), np.nan)
        for r in modules:
            if _module_type(r["module"]) not in members:
                continue
            y, x = li[-1 if r.get("layer") is None else r["layer"]], col_of(r)
            if r.get("delta_cosine") is not None:
                cos[y, x] = r["delta_cosine"]
            if r.get("code_change_frac") is not None:
                codes[y, x] = r["code_change_frac"]
        out.append((title, ["\u2014" if v < 0 else str(v) for v in layers], cols, cos, codes))
    return out


def build_survival(modules: list, title: str):
    """Survival heatmaps as a Figure: layers on y; one row of two panels per stacked module type (experts on
    x) and one for the dense module types (module type on x). Left: delta cosine (viridis, 0..1, negative
    cells in the 'under' colour); right: share of codes changed (cividis, 0..max over the figure). Grey cells:
    no value (no intended delta, or not adapted). None for an empty list."""
    import textwrap

    import matplotlib
    import numpy as np

    if not modules:
        return None
    panels = _survival_panels(modules)
    code_max = max([float(np.nanmax(p[4])) for p in panels if np.isfinite(p[4]).any()] or [1.0]) or 1.0
    cmap_cos = matplotlib.colormaps["viridis"].with_extremes(under=OKABE_ITO["vermillion"], bad="#E8E8E8")
    cmap_codes = matplotlib.colormaps["cividis"].with_extremes(bad="#E8E8E8")
    n_cols = max(len(p[2]) for p in panels)
    n_layers = len(panels[0][1])
    annotate = n_cols <= 16 and n_layers <= 16
    width = min(MAX_WIDTH_IN, max(9.0, 2.0 + 2 * (0.55 * n_cols + 1.4)))
    title = "\n".join(textwrap.fill(line, int(width * 11)) for line in title.splitlines())
    with _style():
        fig = _new_figure(width, len(panels) * (0.32 * n_layers + 1.1) + 0.35 * (title.count("\n") + 1) + 0.4)
        axes = fig.subplots(len(panels), 2, squeeze=False)
        for (ax_cos, ax_codes), (name, ylabels, cols, cos, codes) in zip(axes, panels):
            for ax, grid, cmap, vmax, what in (
                (ax_cos, cos, cmap_cos, 1.0, "delta cosine"),
                (ax_codes, codes, cmap_codes, code_max, "codes changed"),
            ):
                im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", origin="upper")
                ax.set_title(f"{name}: {what}", loc="left")
                ax.set_yticks(range(len(ylabels)), ylabels)
                ax.set_ylabel("layer")
                step = max(1, math.ceil(len(cols) / 16))
                ax.set_xticks(range(0, len(cols), step), cols[::step])
                ax.set_xlabel("module" if name == "dense modules" else "expert")
                if what == "delta cosine" and not np.isfinite(grid).any():
                    ax.text(
                        0.5,
                        0.5,
                        "no intended delta here\n(zero control or not adapted)",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        fontsize=8,
                    )
                elif annotate:
                    for (y, x), v in np.ndenumerate(grid):
                        if np.isfinite(v):
                            dark = v / vmax < 0.55 if vmax else True
                            colour = "white" if dark else "black"
                            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour)
                fig.colorbar(im, ax=ax, fraction=0.05, extend="min" if what == "delta cosine" else "neither")
        fig.suptitle(title, x=0.01, ha="left")
    return fig


def plot_survival(results: dict, path, condition: str, base_dir=None) -> Path | None:
    """Write the survival heatmap of one condition (PNG); None when its per-module noise rows are not found
    (see ``noise_modules``)."""
    rows = noise_modules(results, condition, base_dir)
    verdict = ((results.get("noise") or {}).get(condition) or {}).get("verdict", "")
    title = f"Does the adapter survive the fuse? {condition}"
    with _style():
        fig = build_survival(rows or [], title + (f"\n{verdict}" if verdict else ""))
        return None if fig is None else _save(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def draw_figures(results: dict, out_dir, base_dir=None) -> list:
    """Draw every figure ``results`` supports into ``out_dir``: forest.png, accuracy.png, flips.png and
    survival-<condition>.png per condition with per-module noise rows (``base_dir``, default ``out_dir``, is
    where steps/noise-<cond>/noise.json are looked for). Returns the written paths, in that order."""
    out_dir = Path(out_dir)
    base_dir = out_dir if base_dir is None else Path(base_dir)
    roles = analysis_roles(results, base_dir)
    written = [
        plot_forest(results, out_dir / "forest.png", roles),
        plot_accuracy(results, out_dir / "accuracy.png", roles),
        plot_flips(results, out_dir / "flips.png", roles),
    ]
    for cond in results.get("noise") or {}:
        written.append(plot_survival(results, out_dir / f"survival-{_safe(cond)}.png", cond, base_dir))
    return [p for p in written if p is not None]
