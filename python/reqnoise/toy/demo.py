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
7. The all-layers, all-linear arm (L1: the study's recipe on every adaptable module of every block, the
   persona-override research's recommended target), its zero delta under fresh and keep-grid (L0) and
   norm-matched random deltas (LR*). Before stage 2 is trained, ``reqnoise floor`` measures on the persona model
   what a zero-delta fuse of each arm's target does to Set-G test, and predicts which arm shows the artifact.
8. Set-G test (multiple choice, as in the study) and the identity suite for every condition; recall (cloze:
   each option's fact sentence scored) of the trained facts (their trained question) for the persona, the
   trained adapters and their zero controls, and of the held-out facts for the persona, P1, P0 and S1;
   statistics and the pre-registered kill criterion.
9. The decomposition tables, the checks (whether the floor's prediction held among them), the verdict, the
   report, and the seconds each stage took.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from reqnoise import atomic
from reqnoise.stats.formatting import pct
from reqnoise.stats.inference import MARGIN, equivalence, holm
from reqnoise.toy.world import build_world

CRITERIA = """title = "Set-G knowledge injection (demo)"
hypothesis = "The stage-2 adapter's content adds knowledge on held-out Set-G items"
# The published study's rule: real iff A1 - A0 >= 5 pp AND the two-proportion test gives p < 0.05.
success_if = "diff(A1_fresh, A0_fresh) >= 0.05 and ztest_p(A1_fresh, A0_fresh) < 0.05"
"""


@dataclass(frozen=True)
class DemoRecipe:
    """The demo's sizes and training recipes. ``factual_*``: the study's stage-2 adapter (rank 2, alpha 2 as
    mlx-lm's plain scale, lr 5e-6, 25 steps of 8 = the study's 200 examples); ``recall_*``: the positive
    control and its shuffled-answer twin."""

    per_subject: int  # facts per subject of the world (5 subjects)
    setg_train_frac: float  # Set G's share that trains stage 2 (split by subject)
    knowledge_iters: int
    identity_iters: int
    factual_iters: int
    recall_iters: int
    random_controls: int  # norm-matched random deltas per arm
    factual_lr: float = 5e-6
    factual_scale: float = 2.0
    recall_lr: float = 1e-3


FULL = DemoRecipe(
    per_subject=110,
    setg_train_frac=0.3,
    knowledge_iters=30,
    identity_iters=60,
    factual_iters=25,
    recall_iters=200,
    random_controls=2,
)
QUICK = DemoRecipe(
    per_subject=12,
    setg_train_frac=0.7,
    knowledge_iters=15,
    identity_iters=15,
    factual_iters=5,
    recall_iters=20,
    random_controls=1,
)

STUDY_LAYERS = [1, 2, 3]
# The study's arm and the positive control with its nulls (their random controls R* follow them).
STUDY_CONDITIONS = ("A1_fresh", "A0_fresh", "A1_keep", "A0_keep")
POSITIVE_CONDITIONS = ("P1_fresh", "P0_fresh", "S1_fresh")
# The all-layers, all-linear arm's conditions (its random controls LR* follow them).
ARM_CONDITIONS = ("L1_fresh", "L0_fresh", "L1_keep", "L0_keep")
# The conditions scored on recall (cloze, four rows per item: the demo's costliest evals): of the trained facts,
# each trained adapter beside its zero control (the positive control's comparisons: P1 against P0 and S1); of
# the held-out facts, the positive control and its nulls (the held-out check). The norm-matched random deltas
# are scored on Set-G test only.
RECALL_MODELS = ["persona", *STUDY_CONDITIONS, *POSITIVE_CONDITIONS, *ARM_CONDITIONS]
HELDOUT_MODELS = ["persona", *POSITIVE_CONDITIONS]
# The floor groups run on the persona before stage 2: each arm's target (zero control -> group), then the
# attention projections alone for reference (the table: the artifact's home in this toy).
FLOOR_GROUPS = {"A0_fresh": "experts.down_proj@1-3", "L0_fresh": "all-linear", None: "attention"}


def _model(name, adapter, requant="fresh", control="none", seed=0) -> list:
    return [
        f"[models.{name}]",
        'from = "persona"',
        f'adapter = "{adapter}"',
        f'requant = "{requant}"',
        f'control = "{control}"',
        f"seed = {seed}",
    ]


def demo_spec(p: DemoRecipe) -> str:
    rand = [f"R{i}_fresh" for i in range(1, p.random_controls + 1)]
    recall = dict(
        rank=4, scale=20.0, lr=p.recall_lr, iters=p.recall_iters, modules=["gate_proj", "up_proj", "down_proj"]
    )
    lrand = [f"LR{i}_fresh" for i in range(1, p.random_controls + 1)]
    conditions = ["persona", *STUDY_CONDITIONS, *POSITIVE_CONDITIONS, *rand, *ARM_CONDITIONS, *lrand]
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
    # The all-layers, all-linear arm: the study's recipe on every adaptable module of every block.
    lines += [
        *_model("L1_fresh", "factual_all"),
        *_model("L0_fresh", "factual_all", control="zero"),
        *_model("L1_keep", "factual_all", "keep-grid"),
        *_model("L0_keep", "factual_all", "keep-grid", "zero"),
    ]
    for i, r in enumerate(lrand):
        lines += _model(r, "factual_all", control="random", seed=i + 1)
    lines += [
        "",
        "[adapters.knowledge]",
        'model = "toy"',
        'data = "world/knowledge"',
        "rank = 8",
        "scale = 20.0",
        "lr = 5e-5",
        f"iters = {p.knowledge_iters}",
        "batch_size = 4",
        "mask_prompt = true",
        "[adapters.identity]",
        # Strong enough for the persona to hold on the 3-bit base (15/20 in the full demo; the base 0/20).
        'model = "base"',
        'data = "world/persona"',
        "rank = 8",
        "scale = 20.0",
        "lr = 3e-4",
        f"iters = {p.identity_iters}",
        "batch_size = 4",
        "mask_prompt = true",
        'modules = ["q_proj", "k_proj", "v_proj", "o_proj"]',
        *stage2_adapter(
            "factual",
            "setg:train",
            rank=2,
            scale=p.factual_scale,
            lr=p.factual_lr,
            iters=p.factual_iters,
            modules=["down_proj"],
        ),
        # The same recipe (data, rank, lr, steps) on all layers and all linear modules (routers included): the
        # persona-override research's recommended target, where this toy carries the requantization artifact.
        *stage2_adapter(
            "factual_all",
            "setg:train",
            rank=2,
            scale=p.factual_scale,
            lr=p.factual_lr,
            iters=p.factual_iters,
            modules=None,
            layers=None,
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
        # Every condition scored with the persona model's prior from the eval Set G was built from: the persona
        # answers Set-G test exactly as when Set G was chosen (all wrong), and a flip between two conditions
        # comes from their option scores alone, not from a prior re-estimated on a selected subset.
        "calibrate = true",
        'calibrate_from = "persona"',
        'calibrate_eval = "all"',
        # Cloze: what a model recalls, read without the step from recalled value to option letter; the prior
        # per subject because a subject's items share their four options. Trained facts in the trained question's
        # words: the positive control memorizes them (asked in other words the toy recalled them only weakly).
        "[evals.recall_trained]",
        'items = "setg:train"',
        'mode = "cloze"',
        'calibrate = "subject"',
        f"models = {json.dumps(RECALL_MODELS)}",
        "[evals.recall_heldout]",
        'items = "setg:test"',
        'mode = "cloze"',
        'calibrate = "subject"',
        f"models = {json.dumps(HELDOUT_MODELS)}",
        "",
        "[setg]",
        'eval = "all"',
        'models = ["base", "persona"]',
        f"train_frac = {p.setg_train_frac}",
        "seed = 0",
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
        f'random_controls = {json.dumps(rand)}, trained_controls = ["S1_fresh"] }}, '
        f'{{ trained = "L1_fresh", zero_control = "L0_fresh", random_controls = {json.dumps(lrand)} }}, '
        '["L1_keep", "L0_keep"]]',
        "",
        "[criteria]",
        'file = "criteria.toml"',
        'eval = "setg_test"',
    ]
    return f"conditions = {json.dumps(conditions)}\n" + "\n".join(lines) + "\n"


def prepare_demo(out, p: DemoRecipe) -> Path:
    """Write the world, the criteria and the spec (recipe ``p``) under ``out``; returns the spec
    path. The bytes are deterministic: rewriting them leaves every step key, and so the cache, unchanged."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_world(out / "world", per_subject=p.per_subject, overwrite=True)
    atomic.write_text(out / "criteria.toml", CRITERIA, overwrite=True)
    atomic.write_text(out / "spec.toml", demo_spec(p), overwrite=True)
    return out / "spec.toml"


def stage2_adapter(
    name: str, data: str, *, rank: int, scale: float, lr: float, iters: int, modules, layers=STUDY_LAYERS
) -> list:
    """Spec lines of a stage-2 adapter, by default on layers 1-3 (the study: three layers' experts);
    ``modules``/``layers`` None: every adaptable module / every block."""
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
        *([] if modules is None else [f"modules = {json.dumps(modules)}"]),
        *([] if layers is None else [f"layers = {json.dumps(layers)}"]),
    ]


def run_demo(
    out="reqnoise-demo", *, quick: bool = False, progress: bool = True, log=print, margin: float = MARGIN
) -> dict:
    """Build the world and the spec under ``out`` and run it; print what the run shows. Re-running resumes
    from the step cache. ``margin``: equivalence margin (fraction) of the checks' "matched" lines. Returns the
    results dict (with ``floor``, the persona's floor table, and ``timing``, seconds per stage)."""
    from reqnoise.distributed import on_root, rank_and_size
    from reqnoise.experiment.runner import Runner, run_spec
    from reqnoise.experiment.spec import load_spec

    t0 = time.perf_counter()
    out = Path(out).absolute()
    on_root(lambda: str(prepare_demo(out, QUICK if quick else FULL)))  # one writer under mlx.launch
    # Stage 1 and Set G first, so that the floor of each arm's target is measured (and printed) before stage 2
    # is trained; the full run below finds these steps in the cache.
    upstream = Runner(load_spec(out / "spec.toml"), out, progress=progress, log=log)
    upstream.run_upstream(["persona"], setg=True)
    t_floor = time.perf_counter()
    floor_rep = on_root(
        lambda: demo_floor(
            upstream.model("persona"),
            upstream.items_path("setg_test")[0],
            upstream.evaluate("persona", "all"),
            progress,
        )
    )
    t_floor = time.perf_counter() - t_floor
    if floor_rep:
        log("")
        log(floor_summary(floor_rep))
        log("")
    results = run_spec(out / "spec.toml", out, progress=progress, log=log)
    if not results:  # a rank other than 0 under mlx.launch
        return results
    results["floor"] = floor_rep
    results["checks"] = demo_checks(out, results, margin)
    results["timing"] = timing(
        upstream.timeline, results["steps"], t_floor, time.perf_counter() - t0, ranks=rank_and_size()[1]
    )
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n", overwrite=True)
    log("")
    log(summarize_demo(results))
    log("")
    log(render_timing(results["timing"]))
    log(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {out / 'report.md'}")
    return results


def demo_floor(persona: Path, items: Path, prior_records: Path, progress: bool) -> dict:
    """``reqnoise floor`` of each arm's target on the persona model and Set-G test, scored as the demo's
    setg_test eval (loglik, the prior of ``prior_records``: the persona's records of the eval Set G was built
    from): its fresh rows predict the zero controls."""
    from reqnoise.noise.floor import floor

    groups = list(FLOOR_GROUPS.values())
    return floor(persona, items, groups, calibrate="shared", prior_records=prior_records, progress=progress).to_dict()


def _artifact_rows(floor_rep: dict) -> dict:
    """Zero control (or the reference group's name) -> the floor's fresh row of its target."""
    fresh = {r["group"]: r for r in floor_rep["rows"] if r["requant"] == "fresh"}
    return {cond or group: fresh[group] for cond, group in FLOOR_GROUPS.items() if group in fresh}


def predicted_artifacts(floor_rep: dict) -> list:
    """The zero controls whose target's floor shows the artifact on Set-G test by the test the run's check uses:
    a gain over the persona model with exact McNemar p < 0.05 on all Set-G test items (not only those the
    persona model gets wrong under its own calibration)."""
    return [
        c
        for c, r in _artifact_rows(floor_rep).items()
        if c in FLOOR_GROUPS and r["difference"] > 0 and r["mcnemar_p"] < ARTIFACT_ALPHA
    ]


def floor_summary(floor_rep: dict) -> str:
    from reqnoise.noise.floor import render_table

    pred = predicted_artifacts(floor_rep)
    arms = {"A0_fresh": "the study's arm (A0)", "L0_fresh": "the all-linear arm (L0)"}
    return (
        "floor of each arm's target on the persona model, Set-G test (zero delta, before stage 2):\n"
        + render_table(floor_rep)
        + "\nprediction: the artifact (a Set-G test gain over the persona model, McNemar p < 0.05, from "
        "requantization alone) shows in " + (" and ".join(arms[c] for c in pred) if pred else "neither arm")
    )


def timing(upstream: list, steps: list, floor_seconds: float, total: float, ranks: int = 1) -> dict:
    """Core-seconds per stage (step kind) computed in this run, from the upstream and the full run's timelines.

    Under ``ranks`` processes a collective step (rank None) keeps every rank busy for its seconds, an
    independent one its own rank, the floor rank 0 (the others wait); the rest of ``total * ranks`` is
    planning, loading, reporting and ranks waiting for each other."""
    seen: dict = {}
    for s in list(upstream) + list(steps):
        if not s["cached"]:
            seen[s["step"]] = s
    stages: dict = {}
    for s in seen.values():
        row = stages.setdefault(s["kind"], {"steps": 0, "seconds": 0.0})
        row["steps"] += 1
        row["seconds"] = round(row["seconds"] + s["seconds"] * (ranks if s["rank"] is None else 1), 2)
    stages["floor"] = {"steps": 1, "seconds": round(floor_seconds, 2)}
    counted = sum(r["seconds"] for r in stages.values())
    stages["other (planning, loading, report, waiting)"] = {
        "steps": 0,
        "seconds": round(max(0.0, total * ranks - counted), 2),
    }
    return {"stages": stages, "total": round(total, 2), "ranks": ranks}


def render_timing(t: dict) -> str:
    ranks = t.get("ranks", 1)
    budget = t["total"] * ranks
    lines = [f"{'stage':44s} {'steps':>5s} {'seconds':>8s} {'share':>6s}"]
    if ranks > 1:
        lines[0] += f"   (seconds: core-seconds over {ranks} ranks; share of {ranks} x wall)"
    for kind, row in sorted(t["stages"].items(), key=lambda kv: -kv[1]["seconds"]):
        share = row["seconds"] / budget if budget else 0
        lines.append(f"{kind:44s} {row['steps']:>5d} {row['seconds']:>8.1f} {100 * share:>5.0f}%")
    lines.append(f"{'total (wall)':44s} {'':>5s} {t['total']:>8.1f}")
    return "\n".join(lines)


EVALS = (("setg_test", "Set-G test"), ("recall_trained", "recall, trained"), ("recall_heldout", "recall, held-out"))


def summarize_demo(results: dict) -> str:
    """The lines a reader needs: accuracies, the decompositions, identity, the checks and the verdict."""
    c = results["conditions"]
    lines = [f"{'condition':10s}" + "".join(f"{title:>19s}" for _, title in EVALS) + "   identity"]
    for name, row in c.items():
        if "setg_test" not in row:
            continue
        ident = results["identity"].get(name) or {}
        cells = "".join(
            f"{pct(row[ev]['accuracy']) + ' (n=' + str(row[ev]['n']) + ')' if ev in row else '-':>19s}"
            for ev, _ in EVALS
        )
        lines.append(f"{name:10s}{cells}   {ident.get('score', '-')}/{ident.get('n', '-')}")
    for ev, dec in results["decomposition"].items():  # the rest (keep-grid pairs, A1 on recall) in report.md
        if ev == "setg_test" or "(P1_fresh vs P0_fresh)" in ev or ev == "setg_test (L1_fresh vs L0_fresh)":
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


# The comparisons (eval, condition, comparison row) whose McNemar tests a check's [ok] rests on: one Holm
# family. Only the positive control claims a difference; the "matched" / "no held-out knowledge" lines claim
# equivalence (their McNemar p is printed for information, unadjusted) and say per line why they need no
# correction.
HOLM_FAMILY = (
    ("recall_trained", "P1_fresh", "vs_P0_fresh"),
    ("recall_trained", "P1_fresh", "vs_S1_fresh"),
)
NO_CORRECTION = "no multiplicity correction: [ok] needs every comparison named to be equivalent"


@dataclass
class DemoRun:
    """What the checks read: the run's output directory and results, the equivalence margin (fraction) and
    the Holm-adjusted McNemar p of each comparison in ``HOLM_FAMILY`` that the run has."""

    out: Path
    results: dict
    margin: float = MARGIN
    holm_p: dict = field(default_factory=dict)

    @classmethod
    def of(cls, out: Path, results: dict, margin: float = MARGIN) -> "DemoRun":
        run = cls(Path(out), results, margin)
        family = [key for key in HOLM_FAMILY if run.comparison(*key) is not None]
        _, adjusted = holm([run.comparison(*key)["mcnemar_p"] for key in family])
        run.holm_p = dict(zip(family, adjusted))
        return run

    @property
    def steps(self) -> Path:
        return self.out / "steps"

    def answers(self, ev, cond) -> list:
        """(item id, prediction) in record order."""
        from reqnoise.eval.records import read_records

        return [(r["id"], r["prediction"]) for r in read_records(self.out / "results" / ev / f"{cond}.jsonl")]

    def has_answers(self, ev, cond) -> bool:
        return (self.out / "results" / ev / f"{cond}.jsonl").is_file()

    def comparison(self, ev, cond, row) -> dict | None:
        return self.results["comparisons"].get(ev, {}).get(cond, {}).get(row)

    def gain(self, m, ev="setg_test") -> float:
        """Accuracy of m minus the persona model's, in pp."""
        c = self.results["conditions"]
        return 100 * (c[m][ev]["accuracy"] - c["persona"][ev]["accuracy"])

    def effect(self, ev, cond, row) -> str:
        c = self.comparison(ev, cond, row)
        holm_p = self.holm_p.get((ev, cond, row))
        return f"{100 * c['difference']:+.1f} pp (McNemar p = {c['mcnemar_p']:.2g}" + (
            ")" if holm_p is None else f", Holm p = {holm_p:.2g})"
        )

    def matched(self, named: list, claim: str, topic: str) -> tuple[str, bool]:
        """The clause for "no difference in any of ``named`` ((label, comparison dict) pairs)" and whether
        it holds: only when every comparison is equivalent within the margin."""
        eqs = [(label, equivalence(c, self.margin)) for label, c in named]
        cis = ", ".join(f"{label} [{100 * e.tost_ci[0]:+.1f}, {100 * e.tost_ci[1]:+.1f}]" for label, e in eqs)
        level = f"{100 * (1 - 2 * eqs[0][1].alpha):g}% CI"
        if all(e.verdict == "equivalent" for _, e in eqs):
            return f"{claim}: equivalent within ±{100 * self.margin:g} pp ({level} {cis} pp)", True
        effects = [(label, e) for label, e in eqs if e.verdict == "effect"]
        if effects:
            return f"{topic}: " + "; ".join(f"{label}: {e.describe()}" for label, e in effects), False
        open_ = [e for _, e in eqs if e.verdict != "equivalent"]
        ns = "/".join(str(n) for n in sorted({e.n for e in open_}))
        worst = max(e.not_excluded for e in open_)
        return (
            f"{topic}: inconclusive at n = {ns}: effects up to {100 * worst:.1f} pp are not excluded "
            f"({level} {cis} pp; margin ±{100 * self.margin:g} pp)",
            False,
        )


def _check(text: str, ok) -> dict:
    return {"text": text, "ok": bool(ok)}


def check_keep_grid_weights(run: DemoRun) -> list:
    """Invariant: keep-grid requantization of a zero delta leaves every weight as it was."""
    persona = run.steps / "model-persona" / "model"
    return [
        _check(
            f"keep-grid zero-delta control {z[:2]} has weights bit-identical to the persona model",
            _same_weights(run.steps / f"model-{z}" / "model", persona),
        )
        for z in ("A0_keep", "L0_keep")
        if (run.steps / f"model-{z}" / "model").is_dir()
    ]


def check_keep_grid_answers(run: DemoRun) -> list:
    """Invariant: ... and so every answer, in every eval. The runner does not run a model again whose bytes
    equal an evaluated one's (it copies those records); the line then says so instead of implying a rerun."""

    def how(ev, z):
        step = run.steps / f"eval-{ev}-{z}" / "step.json"
        same = json.loads(step.read_text())["summary"].get("same_weights_as") if step.is_file() else None
        return f" (the same tensors as {same}: its records, not re-run)" if same else ""

    return [
        _check(
            f"keep-grid {z[:2]} answers every {ev} item exactly as the persona model" + how(ev, z),
            run.answers(ev, z) == run.answers(ev, "persona"),
        )
        for z in ("A0_keep", "L0_keep")
        for ev, _ in EVALS
        if run.has_answers(ev, z)
    ]


def check_letter_prior(run: DemoRun) -> list:
    """Set G is only meaningful when the models it is built from answer by item, not by a favourite letter."""
    from reqnoise.eval.setg import letter_prior_warnings

    prior = letter_prior_warnings([run.steps / f"eval-all-{m}" / "records.jsonl" for m in ("base", "persona")])
    return [
        _check(
            "Set G comes from models whose answers depend on the item (no letter above 60% of predictions)"
            + ("" if not prior else ": " + "; ".join(prior)),
            not prior,
        )
    ]


# Each arm: its zero control under fresh and keep-grid requantization and the decomposition key of its pair.
ARMS = (
    ("the study's arm", "A0_fresh", "A0_keep", "setg_test"),
    ("the all-linear arm", "L0_fresh", "L0_keep", "setg_test (L1_fresh vs L0_fresh)"),
)
ARTIFACT_ALPHA = 0.05


def _artifact_shown(run: DemoRun, zero: str, keep: str, dec_key: str):
    """(clause, shown): the arm's zero control gains on Set-G test over the persona model with McNemar p < alpha,
    the decomposition's requantization component is that gain (positive, p < alpha), and the keep-grid zero
    control changes no answer in any eval."""
    c = run.comparison("setg_test", zero, "vs_baseline")
    dec = (run.results.get("decomposition") or {}).get(dec_key)
    if c is None or dec is None:
        return None, False
    art, content = dec["components"][0], dec["components"][1]
    scored = [ev for ev, _ in EVALS if run.has_answers(ev, keep)]
    kept = [ev for ev in scored if run.answers(ev, keep) == run.answers(ev, "persona")]
    keep_ok = "setg_test" in scored and len(kept) == len(scored)
    shown = (
        c["difference"] > 0
        and c["mcnemar_p"] < ARTIFACT_ALPHA
        and art["contribution"] > 0
        and art["mcnemar_p"] < ARTIFACT_ALPHA
        and keep_ok
    )
    clause = (
        f"{zero[:2]} - persona {100 * c['difference']:+.1f} pp ({c['fixed']} wrong->right, {c['broken']} "
        f"right->wrong of {c['n']}, McNemar p = {c['mcnemar_p']:.2g}); decomposition: requantization "
        f"{100 * art['contribution']:+.1f} pp (p = {art['mcnemar_p']:.2g}), content "
        f"{100 * content['contribution']:+.1f} pp (p = {content['mcnemar_p']:.2g}); keep-grid {zero[:2]} "
        + ("changes no answer" if keep_ok else f"changes answers (identical in {len(kept)} of {len(scored)} evals)")
    )
    return clause, shown


def check_artifact(run: DemoRun) -> list:
    """Finding: what fresh requantization of a zero delta does on its own. [ok] only where an arm shows it: a
    paired test (McNemar p < 0.05) of its zero control against the persona model on Set-G test, the
    decomposition attributing the gain to requantization, and keep-grid changing no answer."""
    noise = run.results.get("noise") or {}

    def moved(m):  # how far the zero delta moved the weights, the outputs (the noise report) and the answers
        if not run.has_answers("setg_test", m):
            return ""
        n = noise.get(m) or {}
        codes, kl = (n.get("summary") or {}).get("mean_code_change_frac"), (n.get("outputs") or {}).get("kl_fused_base")
        ours, ref = dict(run.answers("setg_test", m)), dict(run.answers("setg_test", "persona"))
        changed = f", {sum(ours.get(k) != v for k, v in ref.items())} of {len(ref)} answers changed"
        return changed + (
            "" if codes is None or kl is None else f" ({100 * codes:.1f}% of codes, KL to persona {kl:.1g} nats)"
        )

    zeros = [z for z in ("A0_fresh", "P0_fresh", "L0_fresh") if z in run.results["conditions"]]
    point = ", ".join(f"{z[:2]} {run.gain(z):+.1f} pp{moved(z)}" for z in zeros)
    arms = [(label, *_artifact_shown(run, zero, keep, key)) for label, zero, keep, key in ARMS]
    arms = [(label, clause, shown) for label, clause, shown in arms if clause is not None]
    shown = [label for label, _, ok in arms if ok]
    per_arm = "; ".join(f"{label}: {clause}" for label, clause, _ in arms)
    verdict = (
        f"shown in {' and '.join(shown)}"
        if shown
        else f"not shown (needs McNemar p < {ARTIFACT_ALPHA:g} and a requantization component with p < "
        f"{ARTIFACT_ALPHA:g} and keep-grid unchanged)"
    )
    return [
        _check(
            f"fresh requantization alone 'gains' on Set-G test over the persona model (the artifact): {point}. "
            f"{per_arm}: {verdict}",
            bool(shown),
        )
    ]


def check_floor_prediction(run: DemoRun) -> list:
    """Finding: did ``reqnoise floor`` on the persona model, before stage 2, predict which arm shows the artifact?"""
    floor_rep = run.results.get("floor")
    if not floor_rep:
        return []
    rows = _artifact_rows(floor_rep)
    pred = set(predicted_artifacts(floor_rep))
    measured = set()
    counts = []
    for _, zero, _, _ in ARMS:
        c = run.comparison("setg_test", zero, "vs_baseline")
        if c is None or zero not in rows:
            continue
        if c["fixed"] > 0 and c["mcnemar_p"] < ARTIFACT_ALPHA:
            measured.add(zero)
        r = rows[zero]
        counts.append(f"{zero[:2]}: floor {r['fixed']}/{r['broken']}, run {c['fixed']}/{c['broken']}")
    name = lambda cs: " and ".join(sorted(c[:2] for c in cs)) or "neither arm"  # noqa: E731
    return [
        _check(
            f"the floor before stage 2 predicted the artifact in {name(pred)}; the run shows it in {name(measured)}: "
            f"prediction {'held' if pred == measured else 'did not hold'} (wrong->right/right->wrong on Set-G "
            f"test, {'; '.join(counts)})",
            pred == measured,
        )
    ]


def check_study_adapter(run: DemoRun) -> list:
    """Finding: the study's adapter against its zero-delta control, "matched" only by equivalence."""
    a1 = run.comparison("setg_test", "A1_fresh", "vs_zero_control")
    if a1 is None:
        return []
    verdict = ((run.results.get("noise") or {}).get("A1_fresh") or {}).get("verdict")
    clause, ok = run.matched(
        [("A1 - A0", a1)], "its held-out result is matched by the zero-delta control", "match by the zero-delta control"
    )
    return [
        _check(
            f"the study's adapter: A1 {run.gain('A1_fresh'):+.1f} pp on Set-G test, A1 - A0 = "
            f"{run.effect('setg_test', 'A1_fresh', 'vs_zero_control')}: {clause}"
            + (f"; noise report: {verdict}" if verdict else "")
            + f" ({NO_CORRECTION})",
            ok,
        )
    ]


def check_positive_control(run: DemoRun) -> list:
    """Finding: the positive control beats both nulls on the trained facts, by Holm-adjusted McNemar p."""
    keys = [("recall_trained", "P1_fresh", row) for row in ("vs_P0_fresh", "vs_S1_fresh")]
    if any(run.comparison(*k) is None for k in keys):
        return []
    alpha = run.comparison(*keys[0])["alpha"]
    beats = [run.comparison(*k)["difference"] > 0 and run.holm_p[k] < alpha for k in keys]
    return [
        _check(
            f"positive control, recall of the trained facts: P1 - P0 = {run.effect(*keys[0])}, P1 - "
            f"shuffled-answer control = {run.effect(*keys[1])}: content is real only if P1 beats both nulls "
            f"(both Holm-adjusted p < {alpha:g}, Holm over the {len(run.holm_p)} McNemar tests the checks claim)",
            all(beats),
        )
    ]


def check_heldout(run: DemoRun) -> list:
    """Finding: no held-out knowledge, only when every comparison the sentence names is equivalent."""
    keys = [
        ("recall_heldout", "P1_fresh", "vs_P0_fresh"),
        ("recall_heldout", "P1_fresh", "vs_S1_fresh"),
        ("setg_test", "P1_fresh", "vs_S1_fresh"),
    ]
    if any(run.comparison(*k) is None for k in keys):
        return []
    labels = ("recall P1 - P0", "recall P1 - S1", "Set-G P1 - S1")
    clause, ok = run.matched(
        [(label, run.comparison(*k)) for label, k in zip(labels, keys)], "no held-out knowledge", "held-out knowledge"
    )
    return [
        _check(
            f"the same adapter on held-out facts: recall P1 - P0 = {run.effect(*keys[0])}, P1 - S1 = "
            f"{run.effect(*keys[1])}; Set-G test (multiple choice) P1 - S1 = {run.effect(*keys[2])}: {clause} "
            f"({NO_CORRECTION})",
            ok,
        )
    ]


def check_identity(run: DemoRun) -> list:
    """Finding: the stage-1 adapter gives the persona (counts, no test)."""
    ident = run.results.get("identity", {})
    if not (ident.get("persona") and ident.get("base")):
        return []
    return [
        _check(
            f"identity: persona {ident['persona']['score']}/{ident['persona']['n']}, base "
            f"{ident['base']['score']}/{ident['base']['n']}",
            ident["persona"]["score"] > ident["base"]["score"],
        )
    ]


def check_identity_stacking(run: DemoRun) -> list:
    """Finding: stacking the study's adapter keeps the persona (within 2 answers; counts, no test)."""
    ident = run.results.get("identity", {})
    if not (ident.get("A1_fresh") and ident.get("persona")):
        return []
    p1i = ident.get("P1_fresh") or {}
    return [
        _check(
            f"identity survives stacking the study's adapter: A1 (fresh) {ident['A1_fresh']['score']}/"
            f"{ident['A1_fresh']['n']}"
            + (f" (the positive control's far larger delta: P1 {p1i['score']}/{p1i['n']})" if p1i else ""),
            ident["A1_fresh"]["score"] >= ident["persona"]["score"] - 2,
        )
    ]


# The invariants first (they cannot depend on luck), then the findings (this run's numbers, as measured).
CHECKS = (
    check_keep_grid_weights,
    check_keep_grid_answers,
    check_letter_prior,
    check_artifact,
    check_floor_prediction,
    check_study_adapter,
    check_positive_control,
    check_heldout,
    check_identity,
    check_identity_stacking,
)


def demo_checks(out: Path, results: dict, margin: float = MARGIN) -> list:
    """What the demo must show, each as {text, ok}, from ``CHECKS`` in order. ``margin`` (fraction): the
    equivalence margin of the "matched" / "no held-out knowledge" lines."""
    run = DemoRun.of(out, results, margin)
    return [check for fn in CHECKS for check in fn(run)]
