"""Evaluation across ``mlx.launch`` ranks: the batch plan is made whole on every rank, then sharded by batch.

Every rank loads the model, makes the same ``EvalPlan`` from the whole item list (batches, padding widths and
shared prefix fixed before sharding), runs the batches ``balanced_shards`` gives it (by token cost, heaviest
first onto the least-loaded rank, deterministic) and sends its records through ``gather_objects``. A batch is
never split, so every item is computed exactly as a single process computes it: rank 0 writes the bytes a
single process writes, with no reliance on rounding. A rank that fails sends its error instead, and every rank
stops with that rank's reason.
"""

import time

from reqnoise.distributed import balanced_shards, failure_text, gather_objects, raise_failures, rank_and_size
from reqnoise.eval.items import as_items
from reqnoise.eval.multiple_choice import (
    DEFAULT_MAX_TOKENS,
    EvalPlan,
    check_options,
    load_model,
    plan_eval,
    run_plan,
    summarize,
)


def shard_batches(plan: EvalPlan, size: int) -> list[list[int]]:
    """Batch numbers per rank (``size`` lists), balanced by ``plan.batch_costs()``."""
    return balanced_shards(plan.batch_costs(), size)


def evaluate_distributed(
    model,
    items,
    *,
    adapter_path=None,
    mode: str = "loglik",
    batch_size: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    limit: int | None = None,
    seed: int = 0,
    system: str | None = None,
    progress: bool = False,
    log=print,
):
    """``evaluate_items`` across the launched ranks; returns (records in item order, summary) on every rank.

    ``summary.seconds`` is the slowest rank's scoring time (model loading and planning excluded).
    """
    rank, size = rank_and_size()
    check_options(mode, batch_size, max_tokens, limit)
    items = as_items(items)[:limit]  # the limit applies before planning, as in one process
    try:
        net, tok = load_model(model, adapter_path)
        plan = plan_eval(tok, items, mode=mode, batch_size=batch_size, max_tokens=max_tokens, seed=seed, system=system)
        mine = shard_batches(plan, size)[rank]
        t1 = time.perf_counter()
        results = run_plan(net, tok, plan, mine, progress=progress) if mine else {}
        recs = [[i, plan.record(i, res)] for i, res in sorted(results.items())]
        status = {"records": recs, "seconds": time.perf_counter() - t1, "n": len(recs)}
    except Exception as err:  # noqa: BLE001  (every failure must reach the other ranks)
        status = {"error": failure_text(err)}
    everyone = gather_objects(status)
    raise_failures([st.get("error") for st in everyone])
    out = [None] * len(items)
    for st in everyone:
        for i, rec in st["records"]:
            out[i] = rec
    wall = max(st["seconds"] for st in everyone)
    if rank == 0 and log is not None:
        per = ", ".join(
            f"rank {r}: {st['n']} items {st['n'] / st['seconds']:.1f}/s" if st["seconds"] else f"rank {r}: 0 items"
            for r, st in enumerate(everyone)
        )
        log(f"{size} ranks ({per}); total {len(items) / wall:.1f} items/s" if wall else f"{size} ranks")
    return out, summarize(out, mode, wall)
