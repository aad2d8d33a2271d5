"""The experiment runner's plan and its execution, on one process or across ``mlx.launch`` ranks.

The runner first *plans*: every step (toy model, quantization, training, fusion, noise report, evaluation,
Set G, identity) with its content-hash key and the steps it depends on. Nothing runs while planning, so every
rank builds the same plan from the same spec. Execution then goes in waves: a wave holds the uncached steps
whose uncached dependencies are all done.

- *Collective* steps (evaluation) use every rank: evaluation shards whole batches (``reqnoise.distributed``),
  so its records are those of one process; rank 0 writes the step's directory.
- *Independent* steps (training, fusing, noise reports, quantizing, identity, Set G) are spread over the
  ranks, heaviest first onto the least-loaded rank; each is computed and written by exactly one rank. A
  training step runs in a child process outside the launched group (``reqnoise.train.isolated``), so its
  adapter is the bytes one process writes: results do not depend on the rank count.

Which steps are cached is decided once, by rank 0, before anything is written, so all ranks agree on the
waves. A failing step makes every rank stop with the failing rank, step and reason; finished steps stay in
the cache, so a rerun (with any number of ranks) resumes. Without a launcher there is one rank and the plan
runs in order.
"""

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reqnoise.distributed import (
    balanced_shards,
    check_statuses,
    failure_text,
    gather_objects,
    on_root,
    raise_failures,
    rank_and_size,
)
from reqnoise.errors import ReqnoiseError

# Rough relative cost per kind: only the balance of independent steps across ranks depends on it.
COST = {"noise": 3.0, "identity": 3.0, "fuse": 1.0, "quantize": 1.0, "toy": 1.0, "setg": 0.1}


@dataclass
class PlannedStep:
    name: str
    kind: str
    key: str
    deps: list = field(default_factory=list)  # names of planned steps this one reads
    fn: Callable = None  # fn(tmp_dir) -> summary dict; writes the step's files
    collective: bool = False  # every rank takes part; rank 0 writes
    cost: float | None = None  # weight among independent steps; None: COST[kind]


def waves(steps: dict, pending: set) -> list:
    """``pending`` step names grouped by depth among pending steps (a cached dependency is no constraint),
    each wave in plan order."""
    depth = {}
    for name, s in steps.items():  # plan order is a topological order: dependencies are planned first
        if name in pending:
            depth[name] = 1 + max((depth[d] for d in s.deps if d in pending), default=-1)
    out = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for name in steps:
        if name in depth:
            out[depth[name]].append(name)
    return out


def execute(steps: dict, cache, *, log=print) -> tuple[dict, list]:
    """Run the uncached ``steps`` (name -> PlannedStep, in plan order) into ``cache``.

    Returns (records: name -> the step's cache record, timeline: one dict per step with ``step, kind,
    cached, seconds, rank``). Collective over every launched rank."""
    rank, size = rank_and_size()

    def entry(n, seconds=0.0, r=None, cached=False):
        return dict(step=n, kind=steps[n].kind, cached=cached, seconds=seconds, rank=r)

    cached = set(on_root(lambda: [n for n, s in steps.items() if cache.lookup(n, s.key) is not None]))
    timeline = {n: entry(n, cached=True) for n in cached}
    for n in sorted(cached, key=list(steps).index):
        log(f"[cached] {n}")
    for i, wave in enumerate(waves(steps, set(steps) - cached)):
        t_wave = time.perf_counter()
        collective = [n for n in wave if steps[n].collective]
        independent = [n for n in wave if not steps[n].collective]
        weights = [steps[n].cost if steps[n].cost is not None else COST.get(steps[n].kind, 1.0) for n in independent]
        shares = balanced_shards(weights, size)
        for n in collective:
            t0 = time.perf_counter()
            check_statuses(_run_step(steps[n], cache, write=rank == 0, size=size), f"step {n}")
            timeline[n] = entry(n, round(time.perf_counter() - t0, 2), None if size > 1 else 0)
            log(f"[{timeline[n]['seconds']:6.1f}s] {n}" + (f" (all {size} ranks)" if size > 1 else ""))
        error, mine = None, []
        for j in shares[rank]:
            n = independent[j]
            t0 = time.perf_counter()
            error = _run_step(steps[n], cache, write=True, size=size)
            if error:
                error = f"step {n}: {error}"
                break
            mine.append((n, round(time.perf_counter() - t0, 2)))
            if size == 1:
                log(f"[{mine[-1][1]:6.1f}s] {n}")
        everyone = gather_objects({"error": error, "done": mine})  # one collective per wave
        raise_failures([st["error"] for st in everyone], f"wave {i + 1}")
        for r, st in enumerate(everyone):
            for n, sec in st["done"]:
                timeline[n] = entry(n, sec, r)
        if size > 1 and independent:
            wall = time.perf_counter() - t_wave
            per = "; ".join(
                f"rank {r}: {len(st['done'])} step(s) in {sum(s for _, s in st['done']):.1f}s"
                + (f" ({', '.join(n for n, _ in st['done'])})" if st["done"] else "")
                for r, st in enumerate(everyone)
            )
            log(f"[wave {i + 1}] {len(independent)} step(s) over {size} ranks in {wall:.1f}s: {per}")
    records = {n: cache.lookup(n, s.key) for n, s in steps.items()}
    for n, rec in records.items():
        if rec is None:  # written by another rank on a file system this rank does not share
            raise ReqnoiseError(
                f"step {n} was computed by another rank but {cache.dir(n)} is not here: "
                "under mlx.launch --hosts, --out must be a directory every host shares"
            )
    return records, [timeline[n] for n in steps]


def _run_step(step: PlannedStep, cache, *, write: bool, size: int):
    """Compute one step; returns None or the error text. Ranks that take part without writing (collective
    steps on ranks > 0) compute into a private temporary directory that is then discarded."""
    if size == 1:  # one process: the step's own exception, unwrapped
        cache.run(step.name, step.key, step.fn)
        return None
    try:
        if write:
            cache.run(step.name, step.key, step.fn)
        else:
            with tempfile.TemporaryDirectory(prefix="reqnoise-rank-") as tmp:
                step.fn(Path(tmp))
    except Exception as err:  # noqa: BLE001  (every failure must reach the other ranks)
        return failure_text(err)
    return None
