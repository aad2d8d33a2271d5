"""`reqnoise run` under mlx.launch (ring backend, 2 ranks on localhost): the same results as one process,
independent steps (training included: one rank each) spread over both ranks, every step written once, the
adapters byte-identical to one process's; `reqnoise train` under mlx.launch (data-parallel) matches
single-process training; a failing step fails every rank with its reason; the plan's waves."""

import json
import subprocess
import sys

import numpy as np
import pytest

from launch_helpers import launch as _launch
from launch_helpers import needs_launcher
from reqnoise.experiment.plan import PlannedStep, waves
from reqnoise.toy.demo import DemoRecipe

TINY = DemoRecipe(
    per_subject=6,
    setg_train_frac=0.7,
    knowledge_iters=2,
    identity_iters=2,
    factual_iters=4,
    factual_lr=5e-4,
    factual_scale=20.0,
    recall_iters=4,
    random_controls=1,
)


def test_waves_follow_pending_dependencies_only():
    steps = {
        n: PlannedStep(n, "k", n, deps)
        for n, deps in [("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]), ("e", [])]
    }
    assert waves(steps, set(steps)) == [["a", "e"], ["b", "c"], ["d"]]
    assert waves(steps, {"b", "d"}) == [["b"], ["d"]]  # a, c cached: no constraint
    assert waves(steps, set()) == []


def _numbers(results):
    """What a study reads from results.json; timings and paths left out."""
    keep = {k: results[k] for k in ("conditions", "comparisons", "decomposition", "identity")}
    keep["verdict"] = {k: results["verdict"][k] for k in ("met", "numbers")}  # its text names the directory
    for v in keep["identity"].values():
        v.pop("seconds", None)
        v.pop("items_per_s", None)
    return keep


@pytest.mark.slow
@needs_launcher
def test_spec_run_on_two_ranks_gives_the_single_process_results(tmp_path):
    from reqnoise.experiment.runner import run_spec
    from reqnoise.toy.demo import prepare_demo

    one, two = tmp_path / "one", tmp_path / "two"
    run_spec(prepare_demo(one, TINY), one, progress=False, log=lambda *a: None)
    res = _launch(["run", str(prepare_demo(two, TINY)), "--out", str(two), "--quiet"])
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "exited with code" not in out, out[-3000:]
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert _numbers(r2) == _numbers(r1)
    # Each training step ran whole on one rank, outside the launched group: its adapter is the bytes one
    # process writes, so the noise reports of the fused models are equal too, not merely close.
    assert r2["noise"] == r1["noise"]
    for adapter in sorted((one / "steps").glob("adapter-*/adapter/adapters.safetensors")):
        twin = two / "steps" / adapter.relative_to(one / "steps")
        assert twin.read_bytes() == adapter.read_bytes(), adapter.parent.parent.name
    ran = {s["step"]: s for s in r2["steps"] if not s["cached"]}
    spread = {n: s["rank"] for n, s in ran.items() if s["kind"] in ("fuse", "noise", "train")}
    assert set(spread.values()) == {0, 1}, spread  # independent steps went to both ranks
    assert {ran[n]["rank"] for n in ran if ran[n]["kind"] == "train"} == {0, 1}, spread
    assert all(s["rank"] is None for s in ran.values() if s["kind"] == "eval")  # collective
    assert "[wave" in out and "rank 1:" in out  # per-rank progress
    # Resuming under one process reuses every step written by either rank.
    logs = []
    run_spec(two / "spec.toml", two, progress=False, log=logs.append)
    assert not any(line.startswith("[ ") for line in logs), logs
    assert sum(line.startswith("[cached]") for line in logs) == len(r2["steps"])


@pytest.mark.slow
@needs_launcher
def test_data_parallel_training_matches_one_process(tmp_path):
    import mlx.core as mx

    from reqnoise.toy.world import build_world

    world = build_world(tmp_path / "world", per_subject=4)
    model = tmp_path / "toy"
    subprocess.run(
        [sys.executable, "-m", "reqnoise", "toy-model", "--save-path", str(model)], check=True, capture_output=True
    )
    args = [
        "train",
        "--model",
        str(model),
        "--data",
        str(world / "knowledge"),
        "--iters",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--quiet",
    ]
    subprocess.run(
        [sys.executable, "-m", "reqnoise", *args, "--adapter-path", str(tmp_path / "one")],
        check=True,
        capture_output=True,
    )
    res = _launch([*args, "--adapter-path", str(tmp_path / "two")])
    assert res.returncode == 0 and "exited with code" not in res.stdout + res.stderr, res.stderr[-3000:]
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert set(a) == set(b)
    # Adam moves a weight by about lr (1e-3) per step whatever its gradient's size, so where a gradient is near
    # zero the ranks' summation order can flip a step's sign: a few weights differ by up to 2 * iters * lr.
    # An objective that differed (rows lost, ranks not averaged) moves most weights by ~lr; summation order
    # leaves the median weight within 1e-5 (the gradients themselves agree to 1e-5 relative: the test below).
    diffs = mx.concatenate([mx.abs(a[k] - b[k]).reshape(-1) for k in sorted(a)])
    assert mx.max(diffs).item() <= 2 * 6 * 1e-3
    assert float(np.median(np.array(diffs))) <= 1e-5, float(np.median(np.array(diffs)))
    # Training changed something, so the comparison means something: mlx-lm starts every lora_b at zero
    # (lora_a is random from the start, so it would prove nothing).
    lora_b = [k for k in a if k.endswith("lora_b")]
    assert lora_b and all(mx.any(a[k] != 0).item() for k in lora_b), lora_b


@pytest.mark.slow
@needs_launcher
def test_a_failing_step_fails_every_rank_with_its_reason(tmp_path):
    from reqnoise.toy.demo import prepare_demo

    spec = prepare_demo(tmp_path, TINY)
    # A condition whose fuse fails inside its step (after the first training): no module in layer 99.
    text = spec.read_text().replace('conditions = ["persona"', 'conditions = ["broken", "persona"', 1)
    spec.write_text(text + '[models.broken]\nfrom = "toy"\nadapter = "knowledge"\nlayers = [99]\n')
    res = _launch(["run", str(spec), "--out", str(tmp_path / "out"), "--quiet"], timeout=300)
    out = res.stdout + res.stderr
    assert "exited with code 1" in out and "of 2 failed" in out and "step model-broken" in out, out[-3000:]
    assert "selects none" in out
    assert not (tmp_path / "out" / "results.json").exists()


def test_data_parallel_gradient_is_the_one_process_gradient(toy_model_dir, tmp_path, monkeypatch):
    """The ranks' batches (seeded_batches with a comm group) and loss (global_mean_loss) sum to the
    one-process gradient: computed in this process for 2 simulated ranks against mlx-lm's default_loss on the
    whole batch, after one Adam step so that every LoRA factor has a gradient."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import reqnoise.train.data as data
    from reqnoise.toy.world import build_world

    world = build_world(tmp_path / "world", per_subject=4)
    model, tok = load(str(toy_model_dir))
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    ds = data.chat_dataset(data.load_chat_data(world / "knowledge")["train"], tok, mask_prompt=True)

    class Group:
        def __init__(self, rank):
            self.r = rank

        def rank(self):
            return self.r

        def size(self):
            return 2

    def grads(loss, batch, lengths):
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model, batch, lengths)[1]))

    one = data.seeded_batches(ds, 4, 2048, loop=True, seed=3)
    ranks = [data.seeded_batches(ds, 4, 2048, loop=True, comm_group=Group(r), seed=3) for r in (0, 1)]
    opt = optim.Adam(learning_rate=1e-3)
    monkeypatch.setattr(data, "rank_and_size", lambda: (0, 2))
    for step in range(2):
        whole = grads(lambda m, b, ln: default_loss(m, b, ln)[0], *next(one))
        parts = [grads(lambda m, b, ln: data.global_mean_loss(m, b, ln)[0], *next(r)) for r in ranks]
        for k, g in whole.items():
            avg = (parts[0][k] + parts[1][k]) / 2  # what mlx-lm's average_gradients computes
            scale = mx.abs(g).max().item()
            assert mx.abs(avg - g).max().item() <= 1e-5 * max(scale, 1e-12), (step, k)
        opt.update(model, tree_unflatten(list(whole.items())))  # both sides move together
