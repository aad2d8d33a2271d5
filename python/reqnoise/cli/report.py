"""The ``report`` command: redraw every figure and report.md of a run from its results.json alone."""

from reqnoise.errors import ReqnoiseError


def _report(args):
    # Imported here, not at module level, so that `reqnoise --help` does not load matplotlib.
    import json
    from pathlib import Path

    from reqnoise import atomic
    from reqnoise.experiment.figures import draw_figures
    from reqnoise.experiment.report import render_markdown

    src = Path(args.dir)
    path = src / "results.json"
    if not path.is_file():
        raise ReqnoiseError(f"{path}: no such file (give the output directory of a `reqnoise run`)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReqnoiseError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("conditions"), dict):
        raise ReqnoiseError(f"{path}: not a reqnoise results.json (no 'conditions' table)")
    out = Path(args.out) if args.out else src
    written = draw_figures(results, out, base_dir=src)
    # render_markdown reads these keys unconditionally; a results.json from an older or partial run may lack them.
    defaults = dict(name=str(src), verdict=None, comparisons={}, decomposition={}, noise={}, identity={}, steps=[])
    md = render_markdown({**defaults, **results}, {"out": str(out)})
    # Figures report.md does not show yet (the forest plot, the survival heatmaps): listed after it.
    extra = [p for p in written if f"({p.name})" not in md]
    if extra:
        md += "\n## Figures\n\n" + "".join(f"![{p.stem}]({p.name})\n\n" for p in extra)
    atomic.write_text(out / "report.md", md, overwrite=True)
    for p in [*written, out / "report.md"]:
        print(p)


def register(subparsers):
    p = subparsers.add_parser(
        "report",
        help="redraw the figures and report.md of a run from its results.json",
        description="Redraw forest.png, accuracy.png, flips.png, survival-<condition>.png and report.md from "
        "DIR/results.json (and DIR/steps/noise-*/noise.json when present). No model is loaded.",
    )
    p.add_argument("dir", help="output directory of `reqnoise run` (holds results.json)")
    p.add_argument("--out", help="write the figures and report.md here instead of DIR")
    p.set_defaults(func=_report)
