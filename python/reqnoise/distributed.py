"""Running on MLX's distributed runtime (``mlx.launch``): the rank, balanced shards, gathering, failures.

Under ``mlx.launch --backend ring -n N ...`` (or ``--hosts``) every rank runs the same command; work is split
with ``balanced_shards`` (deterministic) and results travel back through ``mx.distributed.all_gather``
(``gather_objects``). A rank that fails sends its error instead of results, so every rank stops with that
rank's reason rather than a partial result. Without a launcher the group has size 1 and nothing changes.
Sharded evaluation is ``reqnoise.eval.sharded``.
"""

import json

from reqnoise.errors import ReqnoiseError

_GROUP = None


def group():
    """The global ``mx.distributed`` group (size 1 when not launched)."""
    global _GROUP
    if _GROUP is None:
        import mlx.core as mx

        _GROUP = mx.distributed.init()
    return _GROUP


def rank_and_size():
    g = group()
    return g.rank(), g.size()


def balanced_shards(weights, size: int) -> list:
    """Split indices ``0..len(weights)-1`` into ``size`` lists with near-equal total weight (LPT: heaviest
    first onto the lightest rank, ties by rank). Each list is returned in ascending index order."""
    loads = [0] * size
    shards = [[] for _ in range(size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(size), key=lambda r: (loads[r], r))
        shards[r].append(i)
        loads[r] += weights[i]
    return [sorted(s) for s in shards]


def gather_objects(obj) -> list:
    """Every rank's JSON-serialisable ``obj``, indexed by rank, on every rank."""
    import mlx.core as mx
    import numpy as np

    g = group()
    if g.size() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj, sort_keys=False).encode(), dtype=np.uint8)
    sizes = np.zeros(g.size(), dtype=np.int32)
    sizes[g.rank()] = data.size
    sizes = np.array(mx.distributed.all_sum(mx.array(sizes), group=g, stream=mx.cpu)).astype(np.int64)
    padded = np.zeros(int(sizes.max()), dtype=np.uint8)
    padded[: data.size] = data
    allg = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=g, stream=mx.cpu))
    return [json.loads(allg[r, : sizes[r]].tobytes().decode()) for r in range(g.size())]


def failure_text(err: BaseException) -> str:
    """What a failed rank sends the others: the exception's type and message."""
    return f"{type(err).__name__}: {err}"


def raise_failures(errors, what: str = "") -> None:
    """``errors[r]`` is rank r's error text or None; raise one ReqnoiseError naming every failed rank."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        where = f" in {what}" if what else ""
        raise ReqnoiseError("; ".join(f"rank {r} of {len(errors)} failed{where}: {e}" for r, e in failed))


def check_statuses(error, what: str = "") -> None:
    """Collective: every rank passes its error (None or text); if any rank failed, every rank raises with the
    failing ranks and reasons, so no rank goes on to a collective that the failed one will never join."""
    raise_failures(gather_objects(error), what)


def on_root(fn):
    """Collective: ``fn()`` on rank 0 only; its JSON-serialisable result on every rank. An exception on rank
    0 is raised on every rank (as ReqnoiseError with rank 0's reason)."""
    rank, size = rank_and_size()
    if size == 1:
        return fn()
    status = None
    if rank == 0:
        try:
            status = {"value": fn()}
        except Exception as err:  # noqa: BLE001  (must reach the other ranks)
            status = {"error": failure_text(err)}
    status = gather_objects(status)[0]
    raise_failures([status.get("error")] + [None] * (size - 1))
    return status["value"]
