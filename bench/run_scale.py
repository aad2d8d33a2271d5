"""Benchmark: `reqnoise run` of the reduced demo spec with 1 process and with 2 ranks (mlx.launch, ring, localhost).

Prints one JSON line per way of running (one process; 2 ranks under mlx.launch; 2 ranks started directly, see
bench/ranks.py) with wall seconds and who computed the steps, and a summary: the speed-ups and whether every
results.json holds the same accuracies, comparisons, decompositions and verdict numbers.

    python bench/run_scale.py [--per-subject 12] [--iters 10]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import ranks  # bench/ranks.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-subject", type=int, default=12)
    ap.add_argument("--iters", type=int, default=10, help="iterations of every training stage")
    args = ap.parse_args()
    import dataclasses

    from reqnoise.toy.demo import QUICK, prepare_demo

    p = dataclasses.replace(
        QUICK,
        per_subject=args.per_subject,
        knowledge_iters=args.iters,
        identity_iters=args.iters,
        factual_iters=args.iters,
        recall_iters=args.iters,
    )
    root = Path(tempfile.mkdtemp(prefix="reqnoise-runscale-"))
    results = {}
    for how in ("1 process", "mlx.launch -n 2", "2 ranks started directly"):
        out = root / f"r{len(results)}"
        cmd = ["-m", "reqnoise", "run", str(prepare_demo(out, p)), "--out", str(out), "--quiet"]
        t0 = time.perf_counter()
        if how == "1 process":
            subprocess.run([sys.executable] + cmd, check=True, capture_output=True)
        else:
            (ranks.via_launch if how.startswith("mlx.launch") else ranks.direct)(cmd)
        wall = time.perf_counter() - t0
        res = json.loads((out / "results.json").read_text())
        by_rank = Counter(
            "all ranks" if s["rank"] is None else f"rank {s['rank']}" for s in res["steps"] if not s["cached"]
        )
        results[how] = dict(res, wall=wall)
        print(
            json.dumps(dict(how=how, wall_s=round(wall, 1), steps=len(res["steps"]), computed_by=by_rank)), flush=True
        )

    def numbers(r):
        return [r[k] for k in ("conditions", "comparisons", "decomposition")] + [r["verdict"]["numbers"]]

    one = results["1 process"]
    print(
        json.dumps(
            {
                "summary": True,
                "same_numbers": all(numbers(r) == numbers(one) for r in results.values()),
                **{
                    f"speedup_{how.replace(' ', '_')}": round(one["wall"] / r["wall"], 2)
                    for how, r in results.items()
                    if how != "1 process"
                },
            }
        )
    )


if __name__ == "__main__":
    main()
