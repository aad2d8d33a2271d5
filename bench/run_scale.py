"""Benchmark: `reqnoise run` of the reduced demo spec with 1 process and with 2 ranks (mlx.launch, ring, localhost).

Prints one JSON line per rank count (wall seconds, steps computed per rank) and a summary: the speed-up and
whether results.json holds the same accuracies, comparisons and verdict numbers.

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-subject", type=int, default=12)
    ap.add_argument("--iters", type=int, default=10, help="iterations of every training stage")
    args = ap.parse_args()
    from reqnoise.demo import QUICK, prepare_demo

    p = dict(QUICK, per_subject=args.per_subject, knowledge_iters=args.iters, identity_iters=args.iters,
             factual_iters=args.iters)
    root = Path(tempfile.mkdtemp(prefix="reqnoise-runscale-"))
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    results = {}
    for ranks in (1, 2):
        out = root / f"r{ranks}"
        spec = prepare_demo(out, p)
        cmd = ["-m", "reqnoise", "run", str(spec), "--out", str(out), "--quiet"]
        cmd = [sys.executable] + cmd if ranks == 1 else [launcher, "--backend", "ring", "-n", str(ranks),
                                                           "--python", sys.executable] + cmd
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        res = json.loads((out / "results.json").read_text())
        by_rank = Counter("all" if s["rank"] is None else f"rank {s['rank']}" for s in res["steps"] if not s["cached"])
        results[ranks] = dict(res, wall=wall)
        print(json.dumps(dict(ranks=ranks, wall_s=round(wall, 1), steps=len(res["steps"]), computed_by=by_rank)),
              flush=True)

    def numbers(r):
        return [r[k] for k in ("conditions", "comparisons", "decomposition")] + [r["verdict"]["numbers"]]

    print(json.dumps({"summary": True, "speedup_2_over_1": round(results[1]["wall"] / results[2]["wall"], 2),
                      "same_numbers": numbers(results[1]) == numbers(results[2])}))

if __name__ == "__main__":
    main()
