"""``reqnoise run spec.toml --out DIR``: pre-register, train, fuse, analyse noise, evaluate, compare, decompose.

Every step is cached by content hash (``reqnoise.experiment.cache``): an interrupted run resumes where it stopped,
and a changed step reruns only what depends on it. Outputs: ``DIR/lock.json`` (written before any training),
``DIR/steps/*`` (models, adapters, records), ``DIR/results/<eval>/<condition>.jsonl``, ``DIR/results.json``,
``DIR/report.md`` and PNG plots.

Every step records, when it is computed, its provenance (time, the lock in force, version; see
``reqnoise.stats.prereg``); ``results/<eval>/<condition>.provenance.json`` carries that of the evaluation and of
every step upstream of it, so a verdict can tell results computed under the lock from results served from a
cache filled before it.
"""

import json
import shutil
from pathlib import Path

from reqnoise import atomic
from reqnoise.distributed import on_root, rank_and_size
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.calibration import calibrate_records, option_prior
from reqnoise.eval.identity import run_identity
from reqnoise.eval.multiple_choice import evaluate_items, summarize
from reqnoise.eval.records import read_records, write_records
from reqnoise.eval.setg import TRAIN_DATA, build_setg_step
from reqnoise.eval.sharded import evaluate_distributed
from reqnoise.experiment.cache import StepCache, model_fingerprint, step_key
from reqnoise.experiment.models import quantize_model_dir
from reqnoise.experiment.plan import PlannedStep, execute
from reqnoise.experiment.report import collect, verdict_dict, write_outputs
from reqnoise.experiment.spec import load_spec
from reqnoise.fuse.options import FuseOptions
from reqnoise.jsonl import read_json
from reqnoise.noise.plot import plot_noise
from reqnoise.stats.prereg import evaluate_lock, lock_criteria, lock_sha256, verify_lock, write_provenance
from reqnoise.toy.model import build_toy_model
from reqnoise.train.config import TrainConfig
from reqnoise.train.isolated import train_alone
from reqnoise.train.tuner import train_adapter

LOCKED_CRITERIA = "criteria.locked.toml"
# Training examples that cost about as much as one fuse step (plan.COST): only the balance of steps over
# ranks depends on it (measured on the toy: ~25 examples/s training, fuse steps ~1 s with their loading).
TRAIN_EXAMPLES_PER_UNIT = 25.0


class Runner:
    def __init__(self, spec, out: Path, progress: bool = True, log=print):
        self.spec = spec
        self.out = Path(out).absolute()
        self.cache = StepCache(self.out)
        self.progress = progress
        self.log = log
        self.keys: dict = {}  # step name -> key
        self.plan: dict = {}  # step name -> PlannedStep, in a dependency-respecting order
        self.records: dict = {}  # step name -> cache record (after execution)
        self.model_paths: dict = {}
        self.adapter_paths: dict = {}
        self.adapter_data: dict = {}  # adapter name -> its training data (a directory or file)
        self.timeline: list = []
        self._content: dict = {}  # model directory -> its model_fingerprint (computed once, when needed)

    # ---------------------------------------------------------------- planning (nothing runs here)
    def step(self, name, kind, params, deps=(), inputs=(), fn=None, collective=False, cost=None):
        """Plan a step: its key covers ``params``, the keys of ``deps`` and the bytes of ``inputs``. ``cost``:
        its weight when independent steps are spread over ranks (default: by kind, ``plan.COST``)."""
        key = step_key(kind, params, [self.keys[d] for d in deps], [Path(p) for p in inputs])
        self.keys[name] = key
        self.plan[name] = PlannedStep(name, kind, key, [d for d in deps if d in self.plan], fn, collective, cost)
        return self.cache.dir(name)

    # ---------------------------------------------------------------- models and adapters
    def _external(self, p):
        path = self.spec.resolve(p)
        if not path.exists():
            raise ReqnoiseError(f"{self.spec.path}: path {path} does not exist")
        return path

    def model(self, name):
        if name in self.model_paths:
            return self.model_paths[name]
        spec = self.spec
        m = spec.models[name]
        kind = spec.model_kind(name)
        step = f"model-{name}"
        if kind == "path":
            path = self._external(m["path"])
            self.keys[step] = step_key("path", {"path": str(path)}, [], [path])
            self.model_paths[name] = path
            return path
        if kind == "toy":
            opts = dict(m["toy"])
            inputs = []
            if "extra_corpus" in opts:
                inputs.append(self._external(opts["extra_corpus"]))

            def build(tmp):
                kw = dict(opts)
                if kw.get("bits") == "none":  # TOML has no null: an unquantized toy
                    kw["bits"] = None
                if "extra_corpus" in kw:
                    kw["extra_corpus"] = self._external(kw["extra_corpus"]).read_text().splitlines()
                build_toy_model(tmp / "model", **kw)
                return {"toy": opts}

            self.step(step, "toy", opts, inputs=inputs, fn=build)
        elif kind == "quantize":
            src = self.model(m["from"])
            q = dict(m["quantize"])

            def quantize(tmp):
                return quantize_model_dir(src, tmp / "model", bits=q.get("bits", 4), group_size=q.get("group_size", 64))

            self.step(step, "quantize", q, deps=[f"model-{m['from']}"], fn=quantize)
        else:
            src = self.model(m["from"])
            ad = self.adapter(m["adapter"])
            params, opts, inputs = self._fuse_options(m)

            def fuse(tmp):
                # fuse.model imports mlx at its top: it loads when a fuse step runs, not when a spec is planned.
                from reqnoise.fuse.model import apply_full_weights, fuse_model

                if read_json(ad / "adapter_config.json", "adapter config").get("fine_tune_type") == "full":
                    return apply_full_weights(src, ad, tmp / "model")
                rep = fuse_model(src, ad, tmp / "model", progress=self.progress, **opts)
                return {"modules": len(rep.modules), "seconds": rep.seconds}

            deps = [f"model-{m['from']}", f"adapter-{m['adapter']}"]
            self.step(step, "fuse", params, deps=deps, inputs=inputs, fn=fuse)
        self.model_paths[name] = self.cache.dir(step) / "model"
        return self.model_paths[name]

    def _fuse_options(self, m) -> tuple:
        """``(step params, fuse keywords, input files)`` of a ``from`` + ``adapter`` model table. A calibration
        file is relative to the spec and enters the key by its bytes, as training data does. Calibrated without
        one: the adapter's training data as this runner trains it (covered by the adapter's key), not the path
        its adapter_config names, which a cached adapter keeps after its data moved."""
        opts = FuseOptions.table_subset(m)
        params, inputs = dict(opts), []
        if "calib_data" in opts:
            path = self._external(opts["calib_data"])
            opts["calib_data"] = str(path)
            del params["calib_data"]
            inputs.append(path)
        elif opts.get("requant") == "calibrated":
            opts["calib_data"] = str(self.adapter_data[m["adapter"]])
        return params, opts, inputs

    def adapter(self, name):
        if name in self.adapter_paths:
            return self.adapter_paths[name]
        a = dict(self.spec.adapters[name])
        model = self.model(a.pop("model"))
        data = a.pop("data")
        a.pop("disjoint_from", None)  # a spec check only: it changes nothing that is trained
        deps = [f"model-{self.spec.adapters[name]['model']}"]
        inputs = []
        ref = a.get("reference")
        if ref is not None:
            # DPO reference: a model of the spec (its step key enters this step's key through deps) or a model
            # directory relative to the spec (its bytes enter through inputs); either way the key follows it.
            if ref in self.spec.models:
                a["reference"] = str(self.model(ref))
                deps.append(f"model-{ref}")
                params_ref = {"reference": f"model:{ref}"}
            else:
                ref_path = self._external(ref)
                a["reference"] = str(ref_path)
                inputs.append(ref_path)
                params_ref = {"reference": str(ref_path)}
        else:
            params_ref = {}
        if str(data).startswith("setg:"):
            self.setg()
            which = TRAIN_DATA.get(str(data))
            if which is None:
                raise ReqnoiseError(
                    f"adapters.{name}: data {data!r}: Set G offers {', '.join(map(repr, TRAIN_DATA))} "
                    "(-shuffled: the shuffled-answer control; -recall: question -> cloze sentence)"
                )
            data_path = self.cache.dir("setg") / which
            deps.append("setg")
        else:
            data_path = self._external(data)
            inputs.append(data_path)
        self.adapter_data[name] = data_path

        def train(tmp):
            if str(data).startswith("setg:") and not data_path.is_dir():
                raise ReqnoiseError(
                    f"adapters.{name}: Set G has no {data_path.name}/ data: {data!r} needs a cloze "
                    "sentence in every item (field 'cloze')"
                )
            if rank_and_size()[1] > 1:  # one rank trains it whole: the bytes a single process writes
                return train_alone(model, data_path, tmp / "adapter", progress=self.progress, **a)
            return train_adapter(model, data_path, tmp / "adapter", progress=self.progress, **a)

        # Independent: under mlx.launch the training steps of a wave are spread over the ranks, each trained by
        # one rank (data-parallel training would make the adapter depend on the rank count).
        cost = TrainConfig(**a)
        self.step(
            f"adapter-{name}",
            "train",
            dict(a, **params_ref),
            deps=deps,
            inputs=inputs,
            fn=train,
            cost=cost.iters * cost.batch_size / TRAIN_EXAMPLES_PER_UNIT,
        )
        self.adapter_paths[name] = self.cache.dir(f"adapter-{name}") / "adapter"
        return self.adapter_paths[name]

    # ---------------------------------------------------------------- evaluation
    def items_path(self, ev):
        items = self.spec.evals[ev]["items"]
        if str(items).startswith("setg:"):
            self.setg()
            which = items.split(":", 1)[1]
            path = self.cache.dir("setg") / f"{which}.jsonl"
            if which not in ("train", "test") and not (which == "paraphrased" and self.spec.setg.get("paraphrases")):
                raise ReqnoiseError(
                    f"evals.{ev}: Set G has no {which!r} split (have: train, test"
                    f"{', paraphrased' if self.spec.setg.get('paraphrases') else ''})"
                )
            return path, ["setg"], []
        path = self._external(items)
        return path, [], [path]

    def _fingerprint(self, path: Path) -> str:
        path = Path(path)
        if path not in self._content:
            self._content[path] = model_fingerprint(path)
        return self._content[path]

    def _same_weights(self, model_name, candidates) -> tuple | None:
        """(model, step record) of the first of ``candidates`` (model name -> step name, planned before this
        one) whose step is in the cache and whose model computes with the same tensors and files as
        ``model_name``'s (``cache.model_fingerprint``), else None. Called while steps execute: a deterministic
        evaluation of the same model gives identical records, so such a step copies them instead of running
        the model again (a keep-grid zero-delta control is its source model, tensor for tensor)."""
        mine = self._fingerprint(self.model(model_name))
        for other, step in candidates.items():
            rec = self.cache.lookup(step, self.keys[step])
            if rec is None or rec.get("summary", {}).get("same_weights_as"):
                continue
            if self._fingerprint(self.model(other)) == mine:
                return other, rec
        return None

    def _reuse(self, model_name, name, candidates, tmp, files=("records.jsonl",)):
        """Copy ``files`` of an earlier step on a byte-identical model into ``tmp``; returns that step's summary
        marked ``same_weights_as``, or None when no earlier step qualifies."""
        found = self._same_weights(model_name, candidates)
        if found is None:
            return None
        other, rec = found
        for f in files:
            shutil.copyfile(self.cache.dir(candidates[other]) / f, tmp / f)
        self.log(f"{name}: the model computes with {other}'s tensors and files: its records are reused, not recomputed")
        return dict(rec["summary"], same_weights_as=other)

    def evaluate(self, model_name, ev):
        name = f"eval-{ev}-{model_name}"
        if name in self.keys:
            return self.cache.dir(name) / "records.jsonl"
        e = self.spec.evals[ev]
        items, deps, inputs = self.items_path(ev)
        model = self.model(model_name)
        if e.get("mode") == "coupling":
            return self._coupling_eval(name, ev, model_name, items, inputs)
        opts = {k: e[k] for k in ("mode", "batch_size", "max_tokens", "limit") if k in e}
        calibrate = e.get("calibrate", False)  # True, False or "subject" (spec-checked)
        params = dict(opts, calibrate=calibrate)
        prior_records = None
        # calibrate_from: the prior from one model's records, so every model paired with it gets the same correction;
        # calibrate_eval: from that model's records of another eval (e.g. the eval Set G was built from).
        src = (e.get("calibrate_from", model_name), e.get("calibrate_eval", ev))
        if calibrate and src != (model_name, ev):
            prior_records = self.evaluate(*src)
            deps = deps + [f"eval-{src[1]}-{src[0]}"]
            for key in ("calibrate_from", "calibrate_eval"):  # only when set: other specs keep their cache keys
                if key in e:
                    params[key] = e[key]

        # Earlier evaluations of the same items with the same options (and prior source): reusable on equal bytes.
        same_eval = {
            m: f"eval-{ev}-{m}"
            for m in self.spec.eval_models(ev)
            if f"eval-{ev}-{m}" in self.keys and self.spec.evals[ev].get("mode") != "coupling"
        }

        def run(tmp):
            reused = self._reuse(model_name, name, same_eval, tmp)
            if reused is not None:
                return reused
            if rank_and_size()[1] > 1:  # every rank scores whole batches, planned before sharding
                recs, summary = evaluate_distributed(model, items, log=self.log, progress=False, **opts)
            else:
                recs, summary = evaluate_items(model, items, progress=self.progress, **opts)
            if calibrate:
                by_subject = calibrate == "subject"
                # The baseline's records keep their raw option_logprobs, so its prior can be taken from them.
                prior = (
                    None if prior_records is None else option_prior(read_records(prior_records), by_subject=by_subject)
                )
                recs = calibrate_records(recs, by_subject=by_subject, prior=prior)
                summary = summarize(recs, f"{opts.get('mode', 'loglik')}-calibrated", summary.seconds)
            write_records(tmp / "records.jsonl", recs)
            return summary.to_dict()

        self.step(
            name,
            "eval",
            params,
            deps=[f"model-{model_name}"] + deps,
            inputs=inputs,
            fn=run,
            collective=True,
        )
        return self.cache.dir(name) / "records.jsonl"

    def _coupling_eval(self, name, ev, model_name, persona, inputs):
        """A marker-coupling eval as records: one per prompt, correct when the reply holds the marker exactly
        when the prompt is persona-conditioned, so paired comparisons and controls apply as to any item set."""
        e = self.spec.evals[ev]
        neutral = self._external(e["neutral"])
        model = self.model(model_name)
        opts = {k: e[k] for k in ("batch_size", "max_tokens") if k in e}
        marker = e["marker"]
        limit = e.get("limit")

        def run(tmp):
            from reqnoise.eval.coupling import load_prompts, run_coupling

            p, n = load_prompts(persona), load_prompts(neutral)
            if limit is not None:
                p, n = p[:limit], n[:limit]
            raw, summary = run_coupling(model, marker, p, n, progress=self.progress, **opts)
            recs = []
            for r in raw:
                want = r["condition"] == "persona"
                recs.append(
                    dict(
                        id=r["id"],
                        subject=r["condition"],
                        correct=r["marker"] == want,
                        parsed=True,
                        prediction="marker" if r["marker"] else "no marker",
                        answer="marker" if want else "no marker",
                        prompt=r["prompt"],
                        response=r["response"],
                    )
                )
            write_records(tmp / "records.jsonl", recs)
            return summary.to_dict()

        params = dict(opts, mode="coupling", marker=marker, limit=limit)
        self.step(name, "eval", params, deps=[f"model-{model_name}"], inputs=inputs + [neutral], fn=run)
        return self.cache.dir(name) / "records.jsonl"

    def probe(self):
        """The [probe] table as one cached step: ``probe.json`` and ``probe.png`` in ``steps/probe``."""
        p = self.spec.probe
        names = list(p["models"])
        paths = [self.model(m) for m in names]
        prompts = self._external(p["prompts"])
        contrast = self._external(p["contrast"]) if "contrast" in p else None
        adapter = self.adapter(p["adapter"]) if "adapter" in p else None
        adapter_on = names.index(p.get("adapter_on", names[0])) if adapter is not None else 0
        opts = {k: p[k] for k in ("layers", "batch_size", "permutations", "seed") if k in p}
        deps = [f"model-{m}" for m in names] + ([f"adapter-{p['adapter']}"] if adapter is not None else [])

        def run(tmp):
            from reqnoise.eval.probe import plot_probe, probe_models

            # The probe names models by their directory; links named as the spec names them label the plot.
            links = tmp / "models"
            links.mkdir()
            for m, path in zip(names, paths):
                (links / m).symlink_to(path.absolute(), target_is_directory=True)
            ad = None
            if adapter is not None:
                ad = links / f"adapter-{p['adapter']}"
                ad.symlink_to(adapter.absolute(), target_is_directory=True)
            result = probe_models(
                [links / m for m in names],
                prompts,
                contrast=contrast,
                adapter=ad,
                adapter_on=adapter_on,
                progress=self.progress,
                **opts,
            )
            shutil.rmtree(links)
            (tmp / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
            plot_probe(result, tmp / "probe.png")
            return {"models": names, "layers": result["layers"], "pairs": len(result["pairs"])}

        params = dict(opts, models=names, adapter=p.get("adapter"), adapter_on=adapter_on)
        self.step("probe", "probe", params, deps=deps, inputs=[prompts] + ([contrast] if contrast else []), fn=run)
        return "probe"

    def identity(self, model_name):
        name = f"identity-{model_name}"
        if name in self.keys:
            return name
        ident = self.spec.identity
        persona = self._external(ident["persona"])
        suite = self._external(ident["suite"]) if "suite" in ident else None
        model = self.model(model_name)

        same_identity = {m: f"identity-{m}" for m in self.spec.identity_models() if f"identity-{m}" in self.keys}

        def run(tmp):
            reused = self._reuse(model_name, name, same_identity, tmp)
            if reused is not None:
                return reused
            recs, summary = run_identity(model, persona, suite=suite, progress=self.progress)
            (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            return summary.to_dict()

        self.step(
            name, "identity", {}, deps=[f"model-{model_name}"], inputs=[persona] + ([suite] if suite else []), fn=run
        )
        return name

    def setg(self):
        if "setg" in self.keys:
            return self.cache.dir("setg")
        s = self.spec.setg
        recs = [self.evaluate(m, s["eval"]) for m in s["models"]]
        items, _, item_inputs = self.items_path(s["eval"])
        para = self._external(s["paraphrases"]) if s.get("paraphrases") else None
        opts = {"train_frac": s.get("train_frac", 0.7), "seed": s.get("seed", 0)}

        def run(tmp):
            return build_setg_step(recs, items, tmp, paraphrases=para, **opts)

        self.step(
            "setg",
            "setg",
            opts,
            deps=[f"eval-{s['eval']}-{m}" for m in s["models"]],
            inputs=item_inputs + ([para] if para else []),
            fn=run,
        )
        return self.cache.dir("setg")

    def noise(self, model_name):
        m = self.spec.models[model_name]
        if self.spec.model_kind(model_name) != "adapter":
            return None
        name = f"noise-{model_name}"
        src, ad = self.model(m["from"]), self.adapter(m["adapter"])
        params, opts, inputs = self._fuse_options(m)
        outputs = bool(self.spec.noise.get("outputs", True))

        def run(tmp):
            from reqnoise.noise.report import noise_report  # imports mlx at its top, as fuse.model

            rep = noise_report(src, ad, outputs=outputs, progress=self.progress, **opts)
            (tmp / "noise.json").write_text(json.dumps(rep, indent=1) + "\n")
            plot_noise(rep, tmp / "noise.png")
            return {
                "summary": rep["summary"],
                "outputs": rep["outputs"],
                "verdict": rep["verdict"],
                "alternatives": rep["alternatives"],
            }

        deps = [f"model-{m['from']}", f"adapter-{m['adapter']}"]
        self.step(name, "noise", dict(params, outputs=outputs), deps=deps, inputs=inputs, fn=run)
        return name

    # ---------------------------------------------------------------- the whole run
    def _lock_first(self):
        """Lock the criteria (if any) before anything is trained; every rank records the lock in the provenance
        of the steps it computes. Returns the lock path or None."""
        if not self.spec.criteria:
            return None

        def locked():
            path = self.lock()
            return [str(path), lock_sha256(path)]

        lock, self.cache.lock_sha256 = on_root(locked)
        return Path(lock)

    def run_upstream(self, models=(), setg: bool = False) -> dict:
        """Lock the criteria as ``run`` does, then plan and execute only the steps ``models`` (and, with
        ``setg``, Set G) need: a caller can look at an intermediate model before the rest is planned (the demo's
        ``floor`` before stage 2). A later ``run`` of the same spec finds these steps in the cache. Returns
        ``{model: directory}``; the timeline of the executed steps is in ``self.timeline``."""
        self._lock_first()
        paths = {m: self.model(m) for m in models}
        if setg:
            self.setg()
        self.records, self.timeline = execute(self.plan, self.cache, log=self.log)
        return paths

    def run(self) -> dict:
        """Plan every step, execute (on every launched rank), then write the outputs (rank 0). Returns the
        results dict on rank 0 and ``{}`` on the other ranks."""
        spec = self.spec
        rank, _ = rank_and_size()
        if rank != 0:  # one voice: rank 0 reports for all (per-rank throughput included)
            self.log, self.progress = (lambda *a, **k: None), False
        lock = self._lock_first()
        for name in spec.model_order():
            if name in spec.identity_models() or any(name in spec.eval_models(e) for e in spec.evals):
                self.model(name)
        evals = {ev: {m: self.evaluate(m, ev) for m in spec.eval_models(ev)} for ev in spec.evals}
        ident_steps = {m: self.identity(m) for m in spec.identity_models()} if spec.identity else {}
        noise_steps = {}
        if spec.noise.get("reports", True):  # reports = false: a quick run without the per-condition noise reports
            noise_steps = {m: n for m in spec.conditions if (n := self.noise(m)) is not None}
        probe_step = self.probe() if spec.probe else None
        self.records, self.timeline = execute(self.plan, self.cache, log=self.log)
        if "setg" in self.records:
            for warning in self.records["setg"]["summary"].get("letter_prior", []):
                self.log(f"warning: {warning}")
        if rank != 0:
            return {}
        results_dir = self.out / "results"
        records = {}
        for ev, by_model in evals.items():
            for m, src in by_model.items():
                dst = results_dir / ev / f"{m}.jsonl"
                with open(src, "rb") as fin, atomic.atomic_file(dst, overwrite=True, mode="wb") as fout:
                    shutil.copyfileobj(fin, fout)
                # The provenance recorded when the steps were computed, not the time of this copy.
                write_provenance(dst, self.provenance(f"eval-{ev}-{m}"))
                records.setdefault(ev, {})[m] = dst
        verdict = None
        if lock is not None:
            v = evaluate_lock(lock, results_dir / spec.criteria["eval"])
            verdict = verdict_dict(v)
            if not v.preregistered:
                self.log("warning: " + v.text.splitlines()[0])
        results = collect(
            name=spec.name,
            spec_path=spec.path,
            analysis=spec.analysis,
            record_paths=records,
            identity={m: self.records[n]["summary"] for m, n in ident_steps.items()},
            noise={m: self.records[n]["summary"] for m, n in noise_steps.items()},
            timeline=self.timeline,
            verdict=verdict,
            probe=None if probe_step is None else self.probe_summary(),
        )
        write_outputs(results, self.out)
        return results

    def probe_summary(self) -> dict:
        """The probe step's result for results.json: per model pair and place, per layer shift and cosine."""
        result = read_json(self.cache.dir("probe") / "probe.json", "probe result")
        keep = ("layer", "shift", "cosine", "probe_acc_b", "probe_p_b")
        pairs = [
            {
                "a": pr["a"],
                "b": pr["b"],
                **{pl: [{k: r[k] for k in keep if k in r} for r in pr.get(pl, [])] for pl in result["places"]},
            }
            for pr in result["pairs"]
        ]
        return {
            "plot": "steps/probe/probe.png",
            "json": "steps/probe/probe.json",
            "places": result["places"],
            "pairs": pairs,
        }

    def provenance(self, name) -> dict:
        """Step ``name`` and every planned step upstream of it -> the provenance each recorded when computed."""
        order, todo = [], [name]
        while todo:
            n = todo.pop()
            if n not in order:
                order.append(n)
                todo += self.plan[n].deps
        return {n: self.records[n].get("provenance") for n in sorted(order, key=list(self.plan).index)}

    def lock(self) -> Path:
        """Lock the spec's criteria in ``OUT/lock.json`` (a resumed run verifies the existing lock instead)."""
        crit = self.spec.resolve(self.spec.criteria["file"])
        lock_path = self.out / "lock.json"
        if lock_path.is_file():
            # Resuming: the criteria copy beside the lock must still match it, and so must the spec's file.
            verify_lock(lock_path)
            if (self.out / LOCKED_CRITERIA).read_bytes() != crit.read_bytes():
                raise ReqnoiseError(
                    f"criteria file {crit} changed after it was locked in {lock_path}; "
                    "pre-registered criteria cannot move (start a new output directory)"
                )
            return lock_path
        # The lock sits beside a copy of the criteria, so moving the output directory keeps it verifiable.
        shutil.copyfile(crit, self.out / LOCKED_CRITERIA)
        lock_criteria(self.out / LOCKED_CRITERIA, lock_path)
        self.log(f"[locked] criteria {crit.name} -> {lock_path}")
        return lock_path


def run_spec(spec_path, out, progress=True, log=print) -> dict:
    """Run an experiment spec; returns the results dict (also written to ``out/results.json``)."""
    spec = load_spec(spec_path)
    return Runner(spec, out, progress=progress, log=log).run()
