"""The README's table of supported model types x quantization modes, from the zoo suite's results.

Run the suite with ``REQNOISE_ZOO_JSON=zoo.json PYTHONPATH=python:tests python -m pytest tests/zoo``, then
``python bench/zoo_table.py zoo.json``: prints a markdown table (and, with ``--json``, the per-cell summary).
A cell is "ok" only when every check of that (type, mode) ran and passed; a skip shows its reason's kind.
"""

import argparse
import json
import sys
from pathlib import Path

E2E_TEST = "test_fused_model_loads_generates_and_evaluates_like_mlx_lms"


def _cell(outcomes):
    if any(o["outcome"] == "failed" for o in outcomes):
        return "FAIL"
    if all(o["outcome"] == "passed" for o in outcomes):
        return "ok"
    reason = next(o["reason"] for o in outcomes if o["outcome"] == "skipped")
    if reason.startswith("not applicable"):
        return "n/a (mlx-lm refuses)"
    if reason.startswith("no tiny configuration"):
        return "not built"
    if reason.startswith("packed format"):
        return "n/a (packed format)"
    if reason.startswith("needs Metal"):
        return "n/a (needs Metal)"
    if "does not list mode" in reason:
        return "not in kernel yet"
    return "skipped"


def summarize(results):
    """{model type: {column: cell}} and the column order."""
    cells: dict = {}
    modes: list = []
    for r in results:
        if r["test"] == E2E_TEST:
            cells.setdefault(r["params"], {}).setdefault("e2e", []).append(r)
            continue
        if "-" not in r["params"]:
            continue
        mtype, mode = r["params"].rsplit("-", 1)
        if mode not in modes:
            modes.append(mode)
        cells.setdefault(mtype, {}).setdefault(mode, []).append(r)
    table = {t: {c: _cell(v) for c, v in cols.items()} for t, cols in sorted(cells.items())}
    return table, modes + ["e2e"]


def markdown(table, columns) -> str:
    head = "| model type | " + " | ".join(columns) + " |"
    rule = "|" + "---|" * (len(columns) + 1)
    rows = [f"| {t} | " + " | ".join(cols.get(c, "") for c in columns) + " |" for t, cols in table.items()]
    return "\n".join([head, rule, *rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="the JSON the suite wrote (REQNOISE_ZOO_JSON)")
    p.add_argument("--json", action="store_true", help="print the cells as JSON instead of markdown")
    args = p.parse_args(argv)
    results = json.loads(Path(args.results).read_text())["results"]
    table, columns = summarize(results)
    print(json.dumps(table, indent=1) if args.json else markdown(table, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
