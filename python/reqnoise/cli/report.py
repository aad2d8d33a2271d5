"""The ``report`` command: redraw every figure and report.md of a run from its results.json alone."""

from reqnoise.errors import ReqnoiseError


def _report(args):
    # Imported here, not at module level, so that `reqnoise --help` does not load matplotlib.
    import json
    from pathlib import Path

    from reqnoise.experiment.report import write_report

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
    # A results.json from an older or partial run may lack keys the renderer reads.
    defaults = dict(name=str(src), verdict=None, comparisons={}, decomposition={}, noise={}, identity={}, steps=[])
    for p in write_report({**defaults, **results}, out, base_dir=src):
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
