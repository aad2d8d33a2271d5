"""``reqnoise demo``: the published stacking confound, reproduced in miniature on the embedded model, offline.

1. A synthetic world of facts (five subjects) asked as multiple-choice questions, and a persona.
2. The toy model learns part of the facts (mlx-lm's tuner), is quantized at 3 bits, and gets a stage-1
   identity adapter (fused) so the persona holds.
3. Set G: the items both the base and the persona model get wrong, split 70/30 by subject.
4. A stage-2 "factual" adapter trained on Set-G train, on three layers' expert projections (rank 4).
5. The trained adapter (A1) and the zero-delta control (A0) fused under fresh and keep-grid requantization,
   plus norm-matched random-delta controls and the shuffled-answer control (S1: the same recipe trained on
   Set-G train with answers permuted within subject: same questions, format and answer distribution, no
   item's answer).
6. Set-G test, a positive control (reworded questions about the facts the adapter was trained on) and the
   identity suite for every condition; statistics and the pre-registered kill criterion.
7. The decomposition table, the verdict and the report.
"""

import json
import time
from pathlib import Path

from reqnoise import atomic
from reqnoise.world import build_world

CRITERIA = '''title = "Set-G knowledge injection (demo)"
hypothesis = "The stage-2 adapter's content adds knowledge on held-out Set-G items"
# The published study's rule: real iff A1 - A0 >= 5 pp AND the two-proportion test gives p < 0.05.
success_if = "diff(A1_fresh, A0_fresh) >= 0.05 and ztest_p(A1_fresh, A0_fresh) < 0.05"
'''

# Sizes and the stage-2 recipe (shared by the factual adapter and its shuffled-answer control).
FULL = dict(per_subject=40, knowledge_iters=30, identity_iters=60, factual_iters=60, factual_lr=5e-4,
            factual_scale=20.0, random_controls=2)
QUICK = dict(per_subject=12, knowledge_iters=15, identity_iters=15, factual_iters=10, factual_lr=5e-4,
             factual_scale=20.0, random_controls=1)


def demo_spec(p: dict) -> str:
    rand = [f"R{i}_fresh" for i in range(1, p["random_controls"] + 1)]
    lines = [
        'name = "reqnoise demo: the stacking confound in miniature"',
        "",
        '[models.toy]',
        'toy = { seed = 0, bits = "none", extra_corpus = "world/corpus.txt" }',
        '[models.knowing]',
        'from = "toy"',
        'adapter = "knowledge"',
        '[models.base]',
        'from = "knowing"',
        'quantize = { bits = 3, group_size = 64 }',
        '[models.persona]',
        'from = "base"',
        'adapter = "identity"',
        'requant = "fresh"',
    ]
    conds = {"A1_fresh": ("none", "fresh", 0), "A0_fresh": ("zero", "fresh", 0),
             "A1_keep": ("none", "keep-grid", 0), "A0_keep": ("zero", "keep-grid", 0)}
    conds.update({r: ("random", "fresh", i + 1) for i, r in enumerate(rand)})
    for name, (control, requant, seed) in conds.items():
        lines += [f"[models.{name}]", 'from = "persona"', 'adapter = "factual"', f'requant = "{requant}"',
                  f'control = "{control}"', f"seed = {seed}"]
    # The shuffled-answer control: the factual adapter's recipe on Set-G train with permuted answers.
    lines += ["[models.S1_fresh]", 'from = "persona"', 'adapter = "shuffled"', 'requant = "fresh"']
    lines += [
        "",
        "[adapters.knowledge]",
        'model = "toy"', 'data = "world/knowledge"', "rank = 8", "scale = 20.0", "lr = 5e-5",
        f"iters = {p['knowledge_iters']}", "batch_size = 4", "mask_prompt = true",
        "[adapters.identity]",
        # Strong enough that norm-matched random deltas on the stage-2 modules leave the persona intact.
        'model = "base"', 'data = "world/persona"', "rank = 8", "scale = 20.0", "lr = 3e-4",
        f"iters = {p['identity_iters']}", "batch_size = 4", "mask_prompt = true",
        'modules = ["q_proj", "k_proj", "v_proj", "o_proj"]',
        *stage2_adapter("factual", "setg:train", p),
        *stage2_adapter("shuffled", "setg:train-shuffled", p),
        "",
        # Contextual calibration: the toy's fine-tunes carry a strong letter prior (see reqnoise.calibration).
        "[evals.all]", 'items = "world/items.jsonl"', 'models = ["base", "persona"]', "calibrate = true",
        "[evals.setg_test]", 'items = "setg:test"', "calibrate = true",
        "[evals.paraphrased]", 'items = "setg:paraphrased"', "calibrate = true",
        "",
        "[setg]", 'eval = "all"', 'models = ["base", "persona"]', "train_frac = 0.7", "seed = 0",
        'paraphrases = "world/reworded.jsonl"',
        "",
        "[identity]", 'persona = "world/persona.toml"', 'models = ["base"]',
        "",
        "[noise]", "outputs = true",
        "",
        "[analysis]", 'eval = "setg_test"', 'baseline = "persona"', 'trained = "A1_fresh"',
        'zero_control = "A0_fresh"', f"random_controls = {json.dumps(rand)}", 'trained_controls = ["S1_fresh"]',
        'pairs = [["A1_keep", "A0_keep"]]',
        "",
        "[criteria]", 'file = "criteria.toml"', 'eval = "setg_test"',
    ]
    conditions = ["persona"] + list(conds) + ["S1_fresh"]
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


def stage2_adapter(name: str, data: str, p: dict) -> list:
    """Spec lines of a stage-2 adapter: the factual adapter and its shuffled-answer control share the recipe
    (only the data differ). Small rank as in the published study; a learning rate at which the toy moves at
    all (the study: 5e-6, at which nothing in the toy survives the fuse)."""
    return [f"[adapters.{name}]", 'model = "persona"', f'data = "{data}"', "rank = 4", f"scale = {p['factual_scale']}",
            f"lr = {p['factual_lr']}", f"iters = {p['factual_iters']}", "batch_size = 8", "mask_prompt = true",
            'modules = ["gate_proj", "up_proj", "down_proj"]', "layers = [1, 2, 3]"]


def run_demo(out="reqnoise-demo", *, quick: bool = False, progress: bool = True, log=print) -> dict:
    """Build the world and the spec under ``out`` and run it; print what the run shows. Re-running resumes
    from the step cache. Returns the results dict."""
    from reqnoise.distributed import on_root
    from reqnoise.runner import run_spec

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


def summarize_demo(results: dict) -> str:
    """The lines a reader needs: accuracies, both decompositions, identity, keep-grid identity, verdict."""
    from reqnoise.report import _pct

    c = results["conditions"]
    lines = ["condition        setg_test               paraphrased (positive control)   identity"]
    for name, row in c.items():
        if "setg_test" not in row:
            continue
        t, pc = row["setg_test"], row.get("paraphrased")
        ident = results["identity"].get(name) or {}
        lines.append(f"{name:16s} {_pct(t['accuracy']):>6s} [{_pct(t['ci_low'])}, {_pct(t['ci_high'])}]"
                     f"   {_pct(pc['accuracy']) if pc else '-':>6s}"
                     f"{'':26s}{ident.get('score', '-')}/{ident.get('n', '-')}")
    for ev, dec in results["decomposition"].items():
        lines += ["", f"decomposition on {ev}:", dec["table"]]
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
    return set(wa) == set(wb) and all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item()
                                      for k in wa)


def demo_checks(out: Path, results: dict) -> list:
    """What the demo must show, each as {text, ok}: the invariants first (they cannot depend on luck), then
    the findings (they depend on this run's numbers and are reported as measured)."""
    from reqnoise.records import read_records

    steps = out / "steps"
    checks = []

    def add(text, ok):
        checks.append({"text": text, "ok": bool(ok)})

    same = _same_weights(steps / "model-A0_keep" / "model", steps / "model-persona" / "model")
    add("keep-grid zero-delta control A0 has weights bit-identical to the persona model", same)
    for ev in ("setg_test", "paraphrased"):
        a = read_records(out / "results" / ev / "A0_keep.jsonl")
        b = read_records(out / "results" / ev / "persona.jsonl")
        add(f"keep-grid A0 answers every {ev} item exactly as the persona model",
            [(r["id"], r["prediction"]) for r in a] == [(r["id"], r["prediction"]) for r in b])
    c = results["conditions"]
    from reqnoise.runner import letter_prior_warnings

    prior = letter_prior_warnings([steps / f"eval-all-{m}" / "records.jsonl" for m in ("base", "persona")])
    add("Set G comes from models whose answers depend on the item (no letter above 60% of predictions)"
        + ("" if not prior else ": " + "; ".join(prior)), not prior)
    fresh_gain = c["A0_fresh"]["setg_test"]["accuracy"] - c["persona"]["setg_test"]["accuracy"]
    add(f"fresh requantization alone (A0) 'gains' {100 * fresh_gain:+.1f} pp on Set-G test over the persona "
        "model (the artifact)", fresh_gain > 0)

    def vs(ev, control):
        return results["comparisons"].get(ev, {}).get("A1_fresh", {}).get(f"vs_{control}")

    def effect(c):
        return f"{100 * c['difference']:+.1f} pp (McNemar p = {c['mcnemar_p']:.2g})"

    held, held_s = vs("setg_test", "zero_control"), vs("setg_test", "S1_fresh")
    if held and held_s:
        add(f"held-out Set-G test: A1 - A0 = {effect(held)}, but A1 - shuffled-answer control = {effect(held_s)}: "
            "the held-out gain is not knowledge", held_s["mcnemar_p"] >= 0.05)
    pos, pos_s = vs("paraphrased", "zero_control"), vs("paraphrased", "S1_fresh")
    if pos and pos_s:
        add(f"positive control (reworded trained facts): A1 - A0 = {effect(pos)}, A1 - shuffled-answer control = "
            f"{effect(pos_s)}: content is real only if A1 beats both nulls"
            + (" (not valid: a letter prior, see above)" if prior else ""),
            all(c["mcnemar_p"] < 0.05 and c["difference"] > 0 for c in (pos, pos_s)) and not prior)
    ident = results.get("identity", {})
    if ident.get("persona") and ident.get("base"):
        add(f"identity: persona {ident['persona']['score']}/{ident['persona']['n']}, base "
            f"{ident['base']['score']}/{ident['base']['n']}", ident["persona"]["score"] > ident["base"]["score"])
    if ident.get("A1_fresh") and ident.get("persona"):
        add(f"identity survives stacking: A1 (fresh) {ident['A1_fresh']['score']}/{ident['A1_fresh']['n']}",
            ident["A1_fresh"]["score"] >= ident["persona"]["score"] - 2)
    return checks
