"""Running on MLX's distributed runtime (``mlx.launch``): the rank, balanced shards, gathering, failures.

Under ``mlx.launch --backend ring -n N ...`` (or ``--hosts``) every rank runs the same command; work is split
with ``balanced_shards`` (deterministic) and results travel back through ``mx.distributed.all_gather``
(``gather_objects``). A rank that fails sends its error instead of results, so every rank stops with that
rank's reason rather than a partial result. Without a launcher the group has size 1 and nothing changes.
Sharded evaluation is ``reqnoise.eval.sharded``.
"""

import json
import os

from reqnoise.errors import ReqnoiseError

_GROUP = None

# What mlx.launch (ring, jaccl, MPI) sets so that mx.distributed.init() joins its group: the variables, the
# prefixes of MPI's, and among them the ones that give a process its rank.
LAUNCHER_ENV = (
    "MLX_RANK",
    "MLX_HOSTFILE",
    "MLX_WORLD_SIZE",
    "MLX_RING_VERBOSE",
    "MLX_JACCL_COORDINATOR",
    "MLX_JACCL_RING",
    "MLX_IBV_DEVICES",
    "MLX_MPI_LIBNAME",
)
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_")
RANK_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


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


def launched() -> bool:
    """Whether this process is a rank started by ``mlx.launch`` (its ring or MPI environment is set)."""
    return any(k in os.environ for k in RANK_ENV)


def without_launcher(env) -> dict:
    """``env`` without what mlx.launch set: a child started with it runs as a group of one."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_ENV and not k.startswith(LAUNCHER_PREFIXES)}


def _free_ports(n: int, tries: int = 50) -> int:
    """A port p such that p .. p+n-1 can all be bound on localhost now (the ring backend's rank ports)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(tries):
        start = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(start, start + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ReqnoiseError(f"no {n} consecutive free ports on localhost for the ring backend")


def run_local_ranks(args, ranks: int) -> int:
    """``python -m reqnoise *args`` as ``ranks`` processes of one ring group on this machine (MLX's ring backend
    on localhost, free ports); rank 0 prints, the other ranks' output is kept for their failure. Returns 0, or
    the first failing rank's exit code after stopping the rest.

    MLX runs a CPU model's ops on one thread, so ranks are how a study uses the other cores; its results do
    not depend on their number (see ``reqnoise.experiment.plan``). This starts the ranks itself, as
    ``mlx.launch --backend ring`` does for local hosts (a hostfile of one ``ip:port`` per rank and
    ``MLX_RANK``), because ``mlx.launch`` relays output in a loop that keeps a core busy.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    start = _free_ports(ranks)
    with tempfile.TemporaryDirectory(prefix="reqnoise-ranks-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{start + r}"] for r in range(ranks)]))
        procs, logs = [], []
        for r in range(ranks):
            env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
            log = None if r == 0 else open(Path(tmp) / f"rank{r}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "reqnoise", *args], env=env, stdout=log, stderr=log))
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.returncode), None)
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait()
        for r, log in enumerate(logs):
            if log is not None:
                if r == failed:
                    log.seek(0)
                    tail = log.read().strip().splitlines()[-20:]
                    print("\n".join(f"[rank {r}] {line}" for line in tail), file=sys.stderr)
                log.close()
        return 0 if failed is None else procs[failed].returncode or 1
