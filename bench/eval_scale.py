"""Benchmark: `reqnoise eval` items/s on the embedded model with 1 and 2 ranks (mlx.launch, ring, localhost).

Prints one JSON line per rank count and a summary with the speed-up; checks that both runs wrote the same bytes.

    python bench/eval_scale.py [--per-subject 40] [--mode loglik]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-subject", type=int, default=40)
    ap.add_argument("--mode", default="loglik", choices=["loglik", "generate"])
    args = ap.parse_args()
    from reqnoise.toy import build_toy_model
    from reqnoise.world import build_world

    root = Path(tempfile.mkdtemp(prefix="reqnoise-evalscale-"))
    world = build_world(root / "world", per_subject=args.per_subject)
    model = build_toy_model(root / "toy", extra_corpus=(world / "corpus.txt").read_text().splitlines())
    n = sum(1 for _ in open(world / "items.jsonl"))
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    results = {}
    for ranks in (1, 2):
        out = root / f"r{ranks}.jsonl"
        cmd = ["-m", "reqnoise", "eval", "--quiet", "--model", str(model), "--items", str(world / "items.jsonl"),
               "--mode", args.mode, "--out", str(out)]
        cmd = [sys.executable] + cmd if ranks == 1 else [launcher, "--backend", "ring", "-n", str(ranks),
                                                           "--python", sys.executable] + cmd
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        results[ranks] = dict(ranks=ranks, items=n, mode=args.mode, wall_s=round(wall, 2),
                              items_per_s_incl_load=round(n / wall, 1))
        print(json.dumps(results[ranks]), flush=True)
    same = (root / "r1.jsonl").read_bytes() == (root / "r2.jsonl").read_bytes()
    print(json.dumps({"summary": True, "speedup_2_over_1": round(results[1]["wall_s"] / results[2]["wall_s"], 2),
                      "records_identical": same}))


if __name__ == "__main__":
    main()
