"""Benchmark: `reqnoise eval` items/s on the embedded model with 1 and 2 ranks (mlx.launch, ring, localhost).

Prints one JSON line per way of running (one process; 2 ranks under mlx.launch; 2 ranks started the way
mlx.launch starts them but without its I/O relay) and a summary with the speed-ups (wall time including model
load, and the evaluation rate that rank 0 reports); checks that every run wrote the same bytes.

    python bench/eval_scale.py [--per-subject 40] [--mode loglik]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ranks  # bench/ranks.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-subject", type=int, default=40)
    ap.add_argument("--mode", default="loglik", choices=["loglik", "cloze", "generate"])
    args = ap.parse_args()
    from reqnoise.toy.model import build_toy_model
    from reqnoise.toy.world import build_world

    root = Path(tempfile.mkdtemp(prefix="reqnoise-evalscale-"))
    world = build_world(root / "world", per_subject=args.per_subject)
    model = build_toy_model(root / "toy", extra_corpus=(world / "corpus.txt").read_text().splitlines())
    n = sum(1 for _ in open(world / "items.jsonl"))
    base = ["-m", "reqnoise", "eval", "--model", str(model), "--items", str(world / "items.jsonl"), "--mode", args.mode]
    results = {}
    for how in ("1 process", "mlx.launch -n 2", "2 ranks started directly"):
        out = root / f"{len(results)}.jsonl"
        cmd = base + ["--out", str(out)]
        t0 = time.perf_counter()
        if how == "1 process":
            p = subprocess.run([sys.executable] + cmd + ["--quiet"], check=True, capture_output=True, text=True)
            text = p.stdout + p.stderr
        else:
            text = (ranks.via_launch if how.startswith("mlx.launch") else ranks.direct)(cmd)
        wall = time.perf_counter() - t0
        rate = re.search(r"([0-9.]+) items/s", text.split("total")[-1] if "total" in text else text)
        results[how] = dict(
            how=how,
            items=n,
            mode=args.mode,
            wall_s=round(wall, 2),
            eval_items_per_s=float(rate.group(1)) if rate else None,
            out=out,
        )
        print(json.dumps({k: v for k, v in results[how].items() if k != "out"}), flush=True)
    one = results["1 process"]
    same = all(r["out"].read_bytes() == one["out"].read_bytes() for r in results.values())
    print(
        json.dumps(
            {
                "summary": True,
                "records_identical": same,
                **{
                    f"speedup_{how.replace(' ', '_')}": dict(
                        wall=round(one["wall_s"] / r["wall_s"], 2),
                        eval=round(r["eval_items_per_s"] / one["eval_items_per_s"], 2),
                    )
                    for how, r in results.items()
                    if how != "1 process"
                },
            }
        )
    )


if __name__ == "__main__":
    main()
