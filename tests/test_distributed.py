"""`reqnoise eval` under mlx.launch (ring backend, 2 ranks on localhost) writes exactly the single-process
records in every mode; the batch plan makes an item's scores independent of how batches are spread over ranks,
even for a model whose numerics depend on the batch; the shard balancing is checked against a brute-force
optimum."""

import itertools
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from launch_helpers import launch, needs_launcher
from reqnoise.distributed import balanced_shards, launched, without_launcher
from reqnoise.eval.items import load_items
from reqnoise.eval.multiple_choice import evaluate_loaded, load_model, loglik_option_scores, plan_eval, run_plan
from reqnoise.eval.sharded import shard_batches


def test_a_launched_rank_is_recognised_and_its_launcher_variables_stripped_for_a_child(monkeypatch):
    # What mlx.launch sets per backend (ring, jaccl, MPI), beside variables a child must keep.
    ring = {"MLX_RANK": "1", "MLX_HOSTFILE": "/tmp/h.json", "MLX_WORLD_SIZE": "2", "MLX_RING_VERBOSE": "1"}
    jaccl = {"MLX_JACCL_COORDINATOR": "10.0.0.1:5000", "MLX_JACCL_RING": "1", "MLX_IBV_DEVICES": "/tmp/d.json"}
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMI_RANK": "1", "PMIX_RANK": "1"}
    keep = {"PATH": "/usr/bin", "MLX_METAL_DEBUG": "0", "HOME": "/root"}
    assert without_launcher({**ring, **jaccl, **mpi, **keep}) == keep
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        for other in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
            monkeypatch.delenv(other, raising=False)
        assert not launched()
        monkeypatch.setenv(name, "0")
        assert launched(), name


def test_balanced_shards_cover_every_index_once_and_are_near_optimal():
    import random

    rng = random.Random(0)
    for _ in range(30):
        w = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        for size in (1, 2, 3):
            shards = balanced_shards(w, size)
            assert sorted(i for s in shards for i in s) == list(range(len(w)))
            got = max(sum(w[i] for i in s) for s in shards)
            best = min(
                max(sum(w[i] for i, r in enumerate(assign) if r == k) for k in range(size))
                for assign in itertools.product(range(size), repeat=len(w))
            )
            assert got <= best * 4 / 3 + 1e-9  # LPT's guarantee
    assert balanced_shards([5, 5, 5, 5], 2) == balanced_shards([5, 5, 5, 5], 2)


class BatchSensitive:
    """The toy model with its logits tilted by an amount that grows with the batch's shape (rows x width), as
    a GPU kernel's tiling or a batch-size-dependent reduction can: the toy on CPU scores a row identically in
    any batch, so it alone could not show whether sharding keeps batches whole."""

    def __init__(self, net):
        self.net = net
        self.layers = net.layers  # make_prompt_cache reads the layer count

    def __call__(self, x, cache=None, **kw):
        out = self.net(x, cache=cache, **kw)
        tilt = mx.arange(out.shape[-1], dtype=out.dtype) / out.shape[-1]
        return out + 1e-3 * x.shape[0] * x.shape[1] * tilt


@pytest.fixture(scope="module")
def world_items(tmp_path_factory):
    from reqnoise.toy.world import build_world

    return load_items(build_world(tmp_path_factory.mktemp("w") / "world", per_subject=3) / "items.jsonl")


@pytest.mark.parametrize("mode", ["loglik", "cloze", "generate"])
def test_an_items_result_does_not_depend_on_how_batches_are_spread_over_ranks(toy_model_dir, world_items, mode):
    net, tok = load_model(toy_model_dir)
    model = BatchSensitive(net)
    plan = plan_eval(tok, world_items, mode=mode, batch_size=8, max_tokens=6)
    assert sorted(i for b in plan.batches for i in b) == list(range(len(world_items)))
    whole = run_plan(model, tok, plan, progress=False)
    records, _ = evaluate_loaded(model, tok, world_items, mode=mode, batch_size=8, max_tokens=6, progress=False)
    assert records == [plan.record(i, whole[i]) for i in range(len(world_items))]
    for size in (2, 3):
        shards = shard_batches(plan, size)
        assert sorted(b for s in shards for b in s) == list(range(len(plan.batches)))
        got = {}
        for mine in shards:  # each "rank" builds its own prefix cache, as a launched rank does
            got.update(run_plan(model, tok, plan, mine, progress=False))
        assert got.keys() == whole.keys()
        for i, value in whole.items():
            if mode == "generate":
                assert got[i] == value
            else:
                assert np.array_equal(got[i], value), (size, i)  # bit for bit, no rounding
    if mode != "generate":
        # The control that makes the above able to fail: scoring a rank's items on their own (batches formed
        # after sharding, as before) does change this model's scores.
        share = [world_items[i] for i in range(0, len(world_items), 2)]
        alone = loglik_option_scores(model, tok, share, batch_size=8, progress=False, cloze=mode == "cloze")
        assert any(not np.array_equal(a, whole[2 * k]) for k, a in enumerate(alone))


def _rank_items(text):
    return [int(n) for n in re.findall(r"rank \d: (\d+) items", text)]


@pytest.mark.slow
@needs_launcher
@pytest.mark.parametrize("mode", ["loglik", "cloze", "generate"])
def test_two_ranks_write_the_single_process_records(toy_model_dir, tmp_path, mode):
    from reqnoise.toy.world import build_world

    world = build_world(tmp_path / "world", per_subject=6)
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["eval", "--quiet", "--model", str(toy_model_dir), "--items", str(world / "items.jsonl"), "--mode", mode]
    args += ["--batch-size", "4", "--max-tokens", "12"]
    env = dict(os.environ)
    subprocess.run(
        [sys.executable, "-m", "reqnoise", *args, "--out", str(single)], check=True, capture_output=True, env=env
    )
    res = launch(args + ["--out", str(double)], timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 ranks" in res.stdout + res.stderr
    per_rank = _rank_items(res.stdout + res.stderr)
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == 30  # both ranks did a share
    assert single.read_bytes() == double.read_bytes()


@pytest.mark.slow
@needs_launcher
def test_a_failing_rank_fails_the_run_with_its_reason(tmp_path, toy_model_dir):
    from reqnoise.toy.world import build_world

    world = build_world(tmp_path / "world", per_subject=2)
    res = launch(
        [
            "eval",
            "--quiet",
            "--model",
            str(tmp_path / "missing-model"),
            "--items",
            str(world / "items.jsonl"),
            "--out",
            str(tmp_path / "out.jsonl"),
        ],
        timeout=300,
    )
    out = res.stdout + res.stderr
    # mlx.launch itself exits 0 and only warns; the ranks exit non-zero with the failing rank's reason.
    assert "exited with code 1" in out
    assert "of 2 failed" in out and "does not exist" in out
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_local_ranks_started_by_reqnoise_write_the_single_process_records(toy_model_dir, tmp_path, capfd):
    """run_local_ranks (what `reqnoise demo --ranks N` uses): one ring group of N processes on localhost."""
    from reqnoise.distributed import run_local_ranks
    from reqnoise.toy.world import build_world

    world = build_world(tmp_path / "world", per_subject=6)
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["eval", "--quiet", "--model", str(toy_model_dir), "--items", str(world / "items.jsonl")]
    subprocess.run([sys.executable, "-m", "reqnoise", *args, "--out", str(single)], check=True, capture_output=True)
    assert run_local_ranks(args + ["--out", str(double)], 2) == 0
    out = capfd.readouterr()
    per_rank = _rank_items(out.out + out.err)
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == 30  # both ranks did a share
    assert single.read_bytes() == double.read_bytes()
    # A failing rank: its exit code comes back, with its reason.
    assert run_local_ranks(["eval", "--quiet", "--model", str(tmp_path / "nope"), *args[4:], "--out", "x"], 2) != 0
    assert "does not exist" in "".join(capfd.readouterr())
