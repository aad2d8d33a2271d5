"""``reqnoise demo``: the published stacking confound, reproduced in miniature on the embedded model, offline.

1. A synthetic world of facts (five subjects) asked as multiple-choice questions, and a persona.
2. The toy model learns part of the facts (mlx-lm's tuner), is quantized at 3 bits, and gets a stage-1
   identity adapter (fused) so the persona holds.
3. Set G: the items both the base and the persona model get wrong, split 70/30 by subject.
4. The study's stage-2 "factual" adapter (A1): Set-G train in the study's format (question + options ->
   ``\\boxed{X}`` + justification), down projections of three layers' experts, rank 2, the study's learning rate.
5. A1 and its zero-delta control (A0) fused under fresh and keep-grid requantization.
6. The positive control: an adapter that can learn the facts in this toy (P1: Set-G train as question -> fact
   sentence, gate/up/down projections of the same layers, 200 steps), its zero delta (P0), its shuffled-answer
   twin (S1: the same recipe on Set-G train with answers permuted within subject: same questions, format and
   answer distribution, no item's answer) and norm-matched random deltas (R*).
7. Set-G test (multiple choice, as in the study), recall of the trained facts asked in other words and recall
   of the held-out facts (cloze: each option's fact sentence scored), and the identity suite, for every
   condition; statistics and the pre-registered kill criterion.
8. The decomposition tables, the verdict and the report.
"""

import json
import time
from pathlib import Path

from reqnoise import atomic
from reqnoise.toy.world import build_world

CRITERIA = """title = "Set-G knowledge injection (demo)"
hypothesis = "The stage-2 adapter's content adds knowledge on held-out Set-G items"
# The published study's rule: real iff A1 - A0 >= 5 pp AND the two-proportion test gives p < 0.05.
success_if = "diff(A1_fresh, A0_fresh) >= 0.05 and ztest_p(A1_fresh, A0_fresh) < 0.05"
"""

# Sizes and recipes. factual_*: the study's stage-2 adapter (rank 2, alpha 2 as mlx-lm's plain scale, lr 5e-6,
# 25 steps of 8 = the study's 200 examples). recall_*: the positive control and its shuffled-answer twin.
FULL = dict(
    per_subject=40,
    knowledge_iters=30,
    identity_iters=60,
    factual_iters=25,
    factual_lr=5e-6,
    factual_scale=2.0,
    recall_iters=200,
    recall_lr=1e-3,
    random_controls=2,
)
QUICK = dict(
    per_subject=12,
    knowledge_iters=15,
    identity_iters=15,
    factual_iters=5,
    factual_lr=5e-6,
    factual_scale=2.0,
    recall_iters=20,
    recall_lr=1e-3,
    random_controls=1,
)


def _model(name, adapter, requant="fresh", control="none", seed=0) -> list:
    return [
        f"[models.{name}]",
        'from = "persona"',
        f'adapter = "{adapter}"',
        f'requant = "{requant}"',
        f'control = "{control}"',
        f"seed = {seed}",
    ]


def demo_spec(p: dict) -> str:
    rand = [f"R{i}_fresh" for i in range(1, p["random_controls"] + 1)]
    recall = dict(
        rank=4, scale=20.0, lr=p["recall_lr"], iters=p["recall_iters"], modules=["gate_proj", "up_proj", "down_proj"]
    )
    conditions = ["persona", "A1_fresh", "A0_fresh", "A1_keep", "A0_keep", "P1_fresh", "P0_fresh", "S1_fresh", *rand]
    lines = [
        'name = "reqnoise demo: the stacking confound in miniature"',
        "",
        "[models.toy]",
        'toy = { seed = 0, bits = "none", extra_corpus = "world/corpus.txt" }',
        "[models.knowing]",
        'from = "toy"',
        'adapter = "knowledge"',
        "[models.base]",
        'from = "knowing"',
        "quantize = { bits = 3, group_size = 64 }",
        "[models.persona]",
        'from = "base"',
        'adapter = "identity"',
        'requant = "fresh"',
        *_model("A1_fresh", "factual"),
        *_model("A0_fresh", "factual", control="zero"),
        *_model("A1_keep", "factual", "keep-grid"),
        *_model("A0_keep", "factual", "keep-grid", "zero"),
        *_model("P1_fresh", "recall"),
        *_model("P0_fresh", "recall", control="zero"),
        *_model("S1_fresh", "shuffled"),
    ]
    for i, r in enumerate(rand):
        lines += _model(r, "recall", control="random", seed=i + 1)
    lines += [
        "",
        "[adapters.knowledge]",
        'model = "toy"',
        'data = "world/knowledge"',
        "rank = 8",
        "scale = 20.0",
        "lr = 5e-5",
        f"iters = {p['knowledge_iters']}",
        "batch_size = 4",
        "mask_prompt = true",
        "[adapters.identity]",
        # Strong enough for the persona to hold on the 3-bit base (15/20 in the full demo; the base 0/20).
        'model = "base"',
        'data = "world/persona"',
        "rank = 8",
        "scale = 20.0",
        "lr = 3e-4",
        f"iters = {p['identity_iters']}",
        "batch_size = 4",
        "mask_prompt = true",
        'modules = ["q_proj", "k_proj", "v_proj", "o_proj"]',
        *stage2_adapter(
            "factual",
            "setg:train",
            rank=2,
            scale=p["factual_scale"],
            lr=p["factual_lr"],
            iters=p["factual_iters"],
            modules=["down_proj"],
        ),
        # The positive control and its shuffled-answer twin: one recipe, only the data differ.
        *stage2_adapter("recall", "setg:train-recall", **recall),
        *stage2_adapter("shuffled", "setg:train-recall-shuffled", **recall),
        "",
        # Contextual calibration: the toy's fine-tunes carry a strong letter prior (see reqnoise.eval.calibration).
        "[evals.all]",
        'items = "world/items.jsonl"',
        'models = ["base", "persona"]',
        "calibrate = true",
        "[evals.setg_test]",
        'items = "setg:test"',
        "calibrate = true",
        # Cloze: what a model recalls, read without the step from recalled value to option letter; the prior
        # per subject because a subject's items share their four options.
        "[evals.recall_trained]",
        'items = "setg:paraphrased"',
        'mode = "cloze"',
        'calibrate = "subject"',
        "[evals.recall_heldout]",
        'items = "setg:test"',
        'mode = "cloze"',
        'calibrate = "subject"',
        "",
        "[setg]",
        'eval = "all"',
        'models = ["base", "persona"]',
        "train_frac = 0.7",
        "seed = 0",
        'paraphrases = "world/reworded.jsonl"',
        "",
        "[identity]",
        'persona = "world/persona.toml"',
        'models = ["base"]',
        "",
        "[noise]",
        "outputs = true",
        "",
        "[analysis]",
        'eval = "setg_test"',
        'baseline = "persona"',
        'trained = "A1_fresh"',
        'zero_control = "A0_fresh"',
        'pairs = [["A1_keep", "A0_keep"], { trained = "P1_fresh", zero_control = "P0_fresh", '
        f'random_controls = {json.dumps(rand)}, trained_controls = ["S1_fresh"] }}]',
        "",
        "[criteria]",
        'file = "criteria.toml"',
        'eval = "setg_test"',
    ]
    return f"conditions = {json.dumps(conditions)}\n" + "\n".join(lines) + "\n"


def prepare_demo(out, p: dict) -> Path:
    """Write the world, the criteria and the spec (sizes ``p``, like FULL) under ``out``; returns the spec
    path. The bytes are deterministic: rewriting them leaves every step key, and so the cache, unchanged."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_world(out / "world", per_subject=p["per_subject"], overwrite=True)
    atomic.write_text(out / "criteria.toml", CRITERIA, overwrite=True)
    atomic.write_text(out / "spec.toml", demo_spec(p), overwrite=True)
    return out / "spec.toml"


def stage2_adapter(name: str, data: str, *, rank: int, scale: float, lr: float, iters: int, modules) -> list:
    """Spec lines of a stage-2 adapter on the experts of layers 1-3 (the study: three layers' experts)."""
    return [
        f"[adapters.{name}]",
        'model = "persona"',
        f'data = "{data}"',
        f"rank = {rank}",
        f"scale = {scale}",
        f"lr = {lr}",
        f"iters = {iters}",
        "batch_size = 8",
        "mask_prompt = true",
        f"modules = {json.dumps(modules)}",
        "layers = [1, 2, 3]",
    ]


def run_demo(out="reqnoise-demo", *, quick: bool = False, progress: bool = True, log=print) -> dict:
    """Build the world and the spec under ``out`` and run it; print what the run shows. Re-running resumes
    from the step cache. Returns the results dict."""
    from reqnoise.distributed import on_root
    from reqnoise.experiment.runner import run_spec

    t0 = time.perf_counter()
    out = Path(out).absolute()
    on_root(lambda: str(prepare_demo(out, QUICK if quick else FULL)))  # one writer under mlx.launch
    results = run_spec(out / "spec.toml", out, progress=progress, log=log)
    if not results:  # a rank other than 0 under mlx.launch
        return results
    results["checks"] = demo_checks(out, results)
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n", overwrite=True)
    log("")
    log(summarize_demo(results))
    log(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {out / 'report.md'}")
    return results


EVALS = (("setg_test", "Set-G test"), ("recall_trained", "recall, trained"), ("recall_heldout", "recall, held-out"))


def summarize_demo(results: dict) -> str:
    """The lines a reader needs: accuracies, the decompositions, identity, the checks and the verdict."""
    from reqnoise.experiment.report import _pct

    c = results["conditions"]
    lines = [f"{'condition':10s}" + "".join(f"{title:>19s}" for _, title in EVALS) + "   identity"]
    for name, row in c.items():
        if "setg_test" not in row:
            continue
        ident = results["identity"].get(name) or {}
        cells = "".join(
            f"{_pct(row[ev]['accuracy']) + ' (n=' + str(row[ev]['n']) + ')' if ev in row else '-':>19s}"
            for ev, _ in EVALS
        )
        lines.append(f"{name:10s}{cells}   {ident.get('score', '-')}/{ident.get('n', '-')}")
    for ev, dec in results["decomposition"].items():  # the rest (keep-grid pairs, A1 on recall) in report.md
        if ev == "setg_test" or "(P1_fresh vs P0_fresh)" in ev:
            lines += ["", f"decomposition on {ev}:", dec["table"]]
    lines.append("")
    for check in results.get("checks", []):
        lines.append(f"[{'ok' if check['ok'] else 'NO'}] {check['text']}")
    v = results.get("verdict")
    if v:
        lines += ["", "pre-registered: " + ("kill criterion met" if v["met"] else "kill criterion not met")]
    return "\n".join(lines)


def _same_weights(a: Path, b: Path) -> bool:
    import mlx.core as mx

    wa, wb = {}, {}
    for d, w in ((a, wa), (b, wb)):
        for f in sorted(d.glob("model*.safetensors")):
            w.update(mx.load(str(f)))
    return set(wa) == set(wb) and all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item() for k in wa)


def _effect(c) -> str:
    return f"{100 * c['difference']:+.1f} pp (McNemar p = {c['mcnemar_p']:.2g})"


def demo_checks(out: Path, results: dict) -> list:
    """What the demo must show, each as {text, ok}: the invariants first (they cannot depend on luck), then
    the findings (they depend on this run's numbers and are reported as measured)."""
    from reqnoise.eval.records import read_records
    from reqnoise.eval.setg import letter_prior_warnings

    steps = out / "steps"
    checks = []

    def add(text, ok):
        checks.append({"text": text, "ok": bool(ok)})

    def answers(ev, cond):  # (item id, prediction) in record order
        return [(r["id"], r["prediction"]) for r in read_records(out / "results" / ev / f"{cond}.jsonl")]

    same = _same_weights(steps / "model-A0_keep" / "model", steps / "model-persona" / "model")
    add("keep-grid zero-delta control A0 has weights bit-identical to the persona model", same)
    for ev, _ in EVALS:
        add(
            f"keep-grid A0 answers every {ev} item exactly as the persona model",
            answers(ev, "A0_keep") == answers(ev, "persona"),
        )
    c, cmp = results["conditions"], results["comparisons"]
    prior = letter_prior_warnings([steps / f"eval-all-{m}" / "records.jsonl" for m in ("base", "persona")])
    add(
        "Set G comes from models whose answers depend on the item (no letter above 60% of predictions)"
        + ("" if not prior else ": " + "; ".join(prior)),
        not prior,
    )

    def gain(m, ev="setg_test"):
        return 100 * (c[m][ev]["accuracy"] - c["persona"][ev]["accuracy"])

    noise = results.get("noise") or {}

    def moved(m):  # how far the zero delta moved the weights, the outputs (the noise report) and the answers
        n = noise.get(m) or {}
        codes, kl = (n.get("summary") or {}).get("mean_code_change_frac"), (n.get("outputs") or {}).get("kl_fused_base")
        ours, ref = dict(answers("setg_test", m)), dict(answers("setg_test", "persona"))
        changed = f", {sum(ours.get(k) != v for k, v in ref.items())} of {len(ref)} answers changed"
        return changed + (
            "" if codes is None or kl is None else f" ({100 * codes:.1f}% of codes, KL to persona {kl:.1g} nats)"
        )

    add(
        f"fresh requantization alone 'gains' on Set-G test over the persona model (the artifact): A0 "
        f"{gain('A0_fresh'):+.1f} pp{moved('A0_fresh')}, P0 {gain('P0_fresh'):+.1f} pp{moved('P0_fresh')}",
        gain("A0_fresh") > 0 or gain("P0_fresh") > 0,
    )
    a1 = cmp.get("setg_test", {}).get("A1_fresh", {})
    if "vs_zero_control" in a1:
        verdict = (noise.get("A1_fresh") or {}).get("verdict")
        add(
            f"the study's adapter: A1 {gain('A1_fresh'):+.1f} pp on Set-G test, A1 - A0 = "
            f"{_effect(a1['vs_zero_control'])}: its held-out result is matched by the zero-delta control"
            + (f"; noise report: {verdict}" if verdict else ""),
            a1["vs_zero_control"]["mcnemar_p"] >= 0.05,
        )
    p1 = {ev: cmp.get(ev, {}).get("P1_fresh", {}) for ev, _ in EVALS}
    if all(k in p1["recall_trained"] for k in ("vs_P0_fresh", "vs_S1_fresh")):
        pos = [p1["recall_trained"]["vs_P0_fresh"], p1["recall_trained"]["vs_S1_fresh"]]
        add(
            f"positive control, trained facts asked in other words: P1 - P0 = {_effect(pos[0])}, P1 - shuffled-answer "
            f"control = {_effect(pos[1])}: content is real only if P1 beats both nulls",
            all(x["mcnemar_p"] < 0.05 and x["difference"] > 0 for x in pos),
        )
    if all(k in p1["recall_heldout"] for k in ("vs_P0_fresh", "vs_S1_fresh")) and "vs_S1_fresh" in p1["setg_test"]:
        held = [
            p1["recall_heldout"]["vs_P0_fresh"],
            p1["recall_heldout"]["vs_S1_fresh"],
            p1["setg_test"]["vs_S1_fresh"],
        ]
        add(
            f"the same adapter on held-out facts: recall P1 - P0 = {_effect(held[0])}, P1 - S1 = {_effect(held[1])}; "
            f"Set-G test (multiple choice) P1 - S1 = {_effect(held[2])}: no held-out knowledge",
            all(x["mcnemar_p"] >= 0.05 for x in held[1:]),
        )
    ident = results.get("identity", {})
    if ident.get("persona") and ident.get("base"):
        add(
            f"identity: persona {ident['persona']['score']}/{ident['persona']['n']}, base "
            f"{ident['base']['score']}/{ident['base']['n']}",
            ident["persona"]["score"] > ident["base"]["score"],
        )
    if ident.get("A1_fresh") and ident.get("persona"):
        p1i = ident.get("P1_fresh") or {}
        add(
            f"identity survives stacking the study's adapter: A1 (fresh) {ident['A1_fresh']['score']}/"
            f"{ident['A1_fresh']['n']}"
            + (f" (the positive control's far larger delta: P1 {p1i['score']}/{p1i['n']})" if p1i else ""),
            ident["A1_fresh"]["score"] >= ident["persona"]["score"] - 2,
        )
    return checks
