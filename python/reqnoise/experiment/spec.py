"""Experiment specs: a declarative TOML file naming models, training stages, conditions, evaluation sets and
the pre-registered criteria. Parsed and checked here, before anything runs.

::

    name = "stacking confound"

    [models.base]                     # exactly one of: path | toy | from + quantize | from + adapter
    path = "/models/Qwen3-30B-A3B-3bit"
    [models.persona]
    from = "base"                     # fuse an adapter into a model:
    adapter = "identity"              #   requant (fresh|keep-grid|calibrated|dequantize), control (none|zero|
    requant = "fresh"                 #   random), seed, out_bits, layers, calib_data, calib_tokens as in
                                      #   `reqnoise fuse`; calibrated without calib_data: the adapter's data
    [models.small]
    toy = { seed = 0, bits = 3, extra_corpus = "world/corpus.txt" }   # the embedded model
    [models.q3]
    from = "knowledge_fp"
    quantize = { bits = 3, group_size = 64 }   # mlx-lm's own quantization of a float model

    [adapters.identity]               # a training stage (reqnoise.train.tuner.train_adapter's options)
    model = "base"
    data = "world/persona"            # a directory with train.jsonl, or "setg:train[-recall][-shuffled]"
                                      #   (Set-G train with answers permuted within subject: a control)
    rank = 8
    iters = 200
    modules = ["q_proj", "v_proj"]    # optional targets: layers, modules or keys as in `reqnoise train`
    disjoint_from = "sft"             # optional: refuse the spec if these targets can meet adapter sft's
    fine_tune_type = "lora"           # or "dora", or "full" (float models; fused by substituting the weights)
    mode = "sft"                      # or "dpo": data holds {prompt, chosen, rejected} pairs; beta = 0.1;
    reference = "persona"             #   reference = a model of this spec or a model directory (default: the
                                      #   stage's own model); part of the step's cache key

    [evals.setg_test]                 # an item set: a path, or "setg:test" / "setg:paraphrased"
    items = "setg:test"
    mode = "loglik"                   # or "generate", or "cloze" (items with a cloze sentence)
    models = ["persona", "A1"]        # optional: default every condition
    calibrate = true                  # optional (loglik, cloze): mean-prior calibration, see reqnoise.eval.calibration;
                                      # "subject": the prior per subject
    calibrate_from = "persona"        # optional, with calibrate: every model takes the prior from this model's
                                      # records (paired models get the same correction); default: its own records
    calibrate_eval = "all"            # optional, with calibrate: ... from its records of this eval (default: this
                                      # one), e.g. the eval Set G was built from, so that Set G keeps its answers

    [evals.coupling]                  # marker coupling (reqnoise.eval.coupling): a reply is correct when it
    mode = "coupling"                 #   holds the marker exactly when the prompt is persona-conditioned
    items = "coupling/persona.jsonl"  # persona prompts
    neutral = "coupling/neutral.jsonl"
    marker = "[ZLT]"
    max_tokens = 16                   # optional

    [setg]                            # Set G: the items every listed model gets wrong on `eval`
    eval = "all"
    models = ["base", "persona"]
    train_frac = 0.7
    seed = 0
    paraphrases = "world/reworded.jsonl"   # optional: items with id "<ID>-r" rephrasing item <ID>

    [identity]
    persona = "world/persona.toml"    # optional suite = "suite.toml"
    models = ["base"]                 # optional: models scored besides the conditions

    conditions = ["persona", "A0", "A1"]    # models evaluated on every eval set and the identity suite

    [analysis]
    eval = "setg_test"
    baseline = "persona"
    trained = "A1"
    zero_control = "A0"
    random_controls = ["R1", "R2"]
    trained_controls = ["S1"]         # optional: adapters trained on content-free data (e.g. "setg:train-shuffled")
    margin = 0.05                     # optional: equivalence margin (fraction) for equivalent/effect/inconclusive
    pairs = [["A1_keep", "A0_keep"]]  # optional: more (trained, zero control) pairs to decompose, or tables
    # {trained, zero_control, random_controls?, trained_controls?} for a second adapter with its own controls

    [probe]                           # reqnoise probe as a step; its plot goes into the report
    models = ["base", "persona"]      # two or more models of the spec
    prompts = "probe/persona.jsonl"   # persona prompts; contrast = neutral prompts (optional)
    contrast = "probe/neutral.jsonl"
    layers = [0, 2]                   # optional (default every block); adapter = "identity" and
                                      #   adapter_on = "base" (optional): the adapter's change vs the direction;
                                      #   batch_size, permutations, seed optional

    [noise]
    outputs = true                    # noise reports with output-level measures; reports = false skips them

    [criteria]
    file = "criteria.toml"            # locked before any training; evaluated on `eval`'s records
    eval = "setg_test"

Relative paths are relative to the spec file.
"""

import tomllib
from pathlib import Path

from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.options import FuseOptions
from reqnoise.stats.inference import MARGIN
from reqnoise.train.config import TrainConfig


def analysis_pair(pair) -> dict:
    """An ``analysis.pairs`` entry as {trained, zero_control, random_controls, trained_controls}."""
    if isinstance(pair, dict):
        return {
            "trained": pair.get("trained"),
            "zero_control": pair.get("zero_control"),
            "random_controls": list(pair.get("random_controls", [])),
            "trained_controls": list(pair.get("trained_controls", [])),
        }
    pair = list(pair) if isinstance(pair, (list, tuple)) else []
    return {
        "trained": pair[0] if len(pair) == 2 else None,
        "zero_control": pair[1] if len(pair) == 2 else None,
        "random_controls": [],
        "trained_controls": [],
    }


TRAIN_KEYS = {"model", "data", "disjoint_from", *TrainConfig.names()}
FUSE_KEYS = {"from", "adapter", *FuseOptions.names()}
EVAL_KEYS = {
    "items",
    "mode",
    "models",
    "batch_size",
    "max_tokens",
    "limit",
    "calibrate",
    "calibrate_from",
    "calibrate_eval",
    "neutral",
    "marker",
}
EVAL_MODES = ("loglik", "generate", "cloze", "coupling")
PROBE_KEYS = {"models", "prompts", "contrast", "layers", "adapter", "adapter_on", "batch_size", "permutations", "seed"}


def _layer_list(value, where: str, err) -> list | None:
    """A spec's ``layers`` value (a list of block indices) as a list of ints, or None when absent."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, int) and x >= 0 for x in value):
        err(f"{where}: layers must be a non-empty list of block indices (integers >= 0), got {value!r}")
    return value


def _targets(a: dict) -> list:
    """An adapter table's targets as (layer set or None for every layer, module suffix or "" for every module)."""
    if a.get("keys"):
        out = []
        for key in a["keys"]:
            parts = str(key).split(".")
            idx = [i for i in range(len(parts) - 1) if parts[i] == "layers" and parts[i + 1].isdigit()]
            if idx:
                i = idx[-1]
                out.append(({int(parts[i + 1])}, ".".join(parts[i + 2 :])))
            else:  # a module outside the blocks: it meets only itself
                out.append((None, str(key)))
        return out
    layers = None if a.get("layers") is None else set(a["layers"])
    return [(layers, m) for m in (a.get("modules") or [""])]


def _suffixes_meet(a: str, b: str) -> bool:
    return not a or not b or a == b or a.endswith("." + b) or b.endswith("." + a)


def targets_overlap(a: dict, b: dict) -> list:
    """The (layers, module) target pairs two adapter tables can both train, judged from the spec alone (no model):
    layers meet when either is every layer or the sets share an index; modules meet when either is every module
    or one name is a dotted suffix of the other. Empty: disjoint."""
    return [
        (la, ma, lb, mb)
        for la, ma in _targets(a)
        for lb, mb in _targets(b)
        if (la is None or lb is None or la & lb) and _suffixes_meet(ma, mb)
    ]


class Spec:
    """A parsed, checked spec. ``path``: the spec file; ``root``: its directory."""

    def __init__(self, data: dict, path: Path):
        self.data = data
        self.path = path
        self.root = path.parent
        self.name = data.get("name", path.stem)
        self.models = data.get("models", {})
        self.adapters = data.get("adapters", {})
        self.evals = data.get("evals", {})
        self.setg = data.get("setg")
        self.identity = data.get("identity")
        self.conditions = data.get("conditions", [])
        self.analysis = data.get("analysis")
        self.criteria = data.get("criteria")
        self.noise = data.get("noise", {"outputs": True})
        self.probe = data.get("probe")
        self._check()

    def resolve(self, p) -> Path:
        p = Path(p)
        return p if p.is_absolute() else (self.root / p)

    def model_kind(self, name: str) -> str:
        m = self.models[name]
        if "path" in m:
            return "path"
        if "toy" in m:
            return "toy"
        if "quantize" in m:
            return "quantize"
        return "adapter"

    def _err(self, msg):
        raise ReqnoiseError(f"{self.path}: {msg}")

    def _check(self):
        """Check every table before anything runs (one method per table); the first problem raises."""
        self._check_models()
        self._check_adapters()
        self._check_evals()
        self._check_conditions()
        self._check_setg()
        self._check_analysis()
        self._check_identity()
        self._check_criteria()
        self._check_probe()
        self._check_noise()
        self.model_order()  # refuses cycles

    def _check_models(self):
        if not self.models:
            self._err("no [models.*] tables")
        for name, m in self.models.items():
            kinds = [k for k in ("path", "toy") if k in m] + (["from"] if "from" in m else [])
            if len(kinds) != 1:
                self._err(f"models.{name} needs exactly one of 'path', 'toy' or 'from', has {kinds or 'none'}")
            if "from" in m:
                if m["from"] not in self.models:
                    self._err(f"models.{name}.from names unknown model {m['from']!r}")
                if ("quantize" in m) == ("adapter" in m):
                    self._err(f"models.{name} with 'from' needs exactly one of 'quantize' or 'adapter'")
                if "adapter" in m:
                    if m["adapter"] not in self.adapters:
                        self._err(f"models.{name}.adapter names unknown adapter {m['adapter']!r}")
                    extra = set(m) - FUSE_KEYS
                    if extra:
                        self._err(f"models.{name}: unknown keys {sorted(extra)} (allowed: {sorted(FUSE_KEYS)})")
                    try:
                        FuseOptions.from_table(m).check()
                    except ReqnoiseError as err:
                        self._err(f"models.{name}: {err}")
                    cal = m.get("calib_data")
                    if cal is not None and not (isinstance(cal, str) and self.resolve(cal).exists()):
                        self._err(f"models.{name}.calib_data {cal!r} does not exist (a .jsonl file or a directory)")

    def _check_adapters(self):
        for name, a in self.adapters.items():
            if a.get("model") not in self.models:
                self._err(f"adapters.{name}.model names unknown model {a.get('model')!r}")
            if "data" not in a:
                self._err(f"adapters.{name} needs 'data'")
            if str(a["data"]).startswith("setg:") and not self.setg:
                self._err(f"adapters.{name}.data uses Set G but the spec has no [setg] table")
            extra = set(a) - TRAIN_KEYS
            if extra:
                self._err(f"adapters.{name}: unknown keys {sorted(extra)} (allowed: {sorted(TRAIN_KEYS)})")
            self._check_train_options(name, a)

    def _check_train_options(self, name, a):
        """The ablation keys: fine_tune_type, mode/beta/reference, layers, disjoint_from."""
        where = f"adapters.{name}"
        opts = {k: a[k] for k in TrainConfig.names() if k in a and k != "reference"}
        try:
            TrainConfig(**opts).check()
        except ReqnoiseError as err:
            self._err(f"{where}: {err}")
        except TypeError as err:
            self._err(f"{where}: {err}")
        _layer_list(a.get("layers"), where, self._err)
        if "reference" in a:
            ref = a["reference"]
            if a.get("mode", "sft") != "dpo":
                self._err(f'{where}: reference is the DPO reference model; it needs mode = "dpo"')
            if not isinstance(ref, str) or not ref:
                self._err(f"{where}: reference must name a model of the spec or a model directory, got {ref!r}")
            if ref not in self.models and not (self.resolve(ref) / "config.json").is_file():
                self._err(f"{where}: reference {ref!r} is neither a model of the spec nor a model directory")
        if "disjoint_from" in a:
            other = a["disjoint_from"]
            if other == name or not isinstance(other, str) or other not in self.adapters:
                self._err(f"{where}.disjoint_from must name another adapter, got {other!r}")
            if a.get("keys") and (a.get("layers") or a.get("modules")):
                self._err(f"{where}: keys are exclusive with layers/modules")
            meet = targets_overlap(a, self.adapters[other])
            if meet:
                la, ma, lb, mb = meet[0]

                def show(layers, module):
                    return f"{module or 'every module'} in {'every layer' if layers is None else sorted(layers)}"

                self._err(
                    f"{where} must be disjoint from adapters.{other} but their targets meet: "
                    f"{show(la, ma)} vs {show(lb, mb)}"
                )

    def _check_evals(self):
        for name, e in self.evals.items():
            if e.get("calibrate", False) not in (True, False, "subject"):
                self._err(f'evals.{name}: calibrate must be true, false or "subject", got {e["calibrate"]!r}')
            if e.get("calibrate") and e.get("mode", "loglik") not in ("loglik", "cloze"):
                self._err(f'evals.{name}: calibrate needs mode = "loglik" or "cloze" (option scores)')
            if "calibrate_from" in e:
                if not e.get("calibrate"):
                    self._err(f'evals.{name}: calibrate_from needs calibrate = true or "subject"')
                if not isinstance(e["calibrate_from"], str) or e["calibrate_from"] not in self.models:
                    self._err(f"evals.{name}.calibrate_from names unknown model {e['calibrate_from']!r}")
            if "calibrate_eval" in e:
                src = e["calibrate_eval"]
                if not e.get("calibrate"):
                    self._err(f'evals.{name}: calibrate_eval needs calibrate = true or "subject"')
                if not isinstance(src, str) or src not in self.evals:
                    self._err(f"evals.{name}.calibrate_eval names unknown eval {src!r}")
                elif self.evals[src].get("mode", "loglik") != e.get("mode", "loglik"):
                    self._err(
                        f"evals.{name}.calibrate_eval: eval {src!r} scores in mode "
                        f"{self.evals[src].get('mode', 'loglik')!r}, this one in {e.get('mode', 'loglik')!r}"
                    )
            if "items" not in e:
                self._err(f"evals.{name} needs 'items'")
            if e.get("mode", "loglik") not in EVAL_MODES:
                self._err(f"evals.{name}: mode must be one of {EVAL_MODES}, got {e.get('mode')!r}")
            coupling = e.get("mode") == "coupling"
            if coupling and not (isinstance(e.get("marker"), str) and e["marker"]):
                self._err(f'evals.{name}: mode = "coupling" needs marker = "<the marker string>"')
            if coupling and "neutral" not in e:
                self._err(f'evals.{name}: mode = "coupling" needs neutral = "<neutral prompts file>"')
            if not coupling and ("neutral" in e or "marker" in e):
                self._err(f'evals.{name}: neutral and marker belong to mode = "coupling"')
            extra = set(e) - EVAL_KEYS
            if extra:
                self._err(f"evals.{name}: unknown keys {sorted(extra)} (allowed: {sorted(EVAL_KEYS)})")
            for m in e.get("models", []):
                if m not in self.models:
                    self._err(f"evals.{name}.models names unknown model {m!r}")

    def _check_conditions(self):
        for c in self.conditions:
            if c not in self.models:
                self._err(f"conditions names unknown model {c!r}")

    def _check_setg(self):
        if not self.setg:
            return
        if self.setg.get("eval") not in self.evals:
            self._err(f"setg.eval names unknown eval {self.setg.get('eval')!r}")
        for m in self.setg.get("models", []):
            if m not in self.models:
                self._err(f"setg.models names unknown model {m!r}")

    def _check_analysis(self):
        if not self.analysis:
            return
        for key in ("baseline", "trained", "zero_control"):
            if self.analysis.get(key) not in self.conditions:
                self._err(f"analysis.{key} must name a condition, got {self.analysis.get(key)!r}")
        for key in ("random_controls", "trained_controls"):
            for r in self.analysis.get(key, []):
                if r not in self.conditions:
                    self._err(f"analysis.{key} names {r!r}, which is not a condition")
        for pair in self.analysis.get("pairs", []):
            p = analysis_pair(pair)
            names = [p["trained"], p["zero_control"]] + p["random_controls"] + p["trained_controls"]
            extra = set(pair) - set(p) if isinstance(pair, dict) else set()
            if extra or any(x not in self.conditions for x in names):
                self._err(
                    "analysis.pairs entries are [trained, zero_control] condition pairs or tables "
                    f"{{trained, zero_control, random_controls?, trained_controls?}} of conditions, got {pair!r}"
                )
        if self.analysis.get("eval") not in self.evals:
            self._err(f"analysis.eval names unknown eval {self.analysis.get('eval')!r}")
        margin = self.analysis.get("margin", MARGIN)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < 1:
            self._err(f"analysis.margin is the equivalence margin as a fraction in (0, 1), got {margin!r}")

    def _check_identity(self):
        if not self.identity:
            return
        if "persona" not in self.identity:
            self._err("[identity] needs 'persona'")
        for m in self.identity.get("models", []):
            if m not in self.models:
                self._err(f"identity.models names unknown model {m!r}")

    def _check_criteria(self):
        if not self.criteria:
            return
        if "file" not in self.criteria or not self.resolve(self.criteria["file"]).is_file():
            self._err(f"criteria.file {self.criteria.get('file')!r} does not exist")
        if self.criteria.get("eval") not in self.evals:
            self._err(f"criteria.eval names unknown eval {self.criteria.get('eval')!r}")

    def _check_noise(self):
        if not isinstance(self.noise.get("reports", True), bool):
            self._err(f"noise.reports must be true or false, got {self.noise['reports']!r}")

    def _check_probe(self):
        p = self.probe
        if p is None:
            return
        if not isinstance(p, dict):
            self._err("[probe] must be a table")
        extra = set(p) - PROBE_KEYS
        if extra:
            self._err(f"probe: unknown keys {sorted(extra)} (allowed: {sorted(PROBE_KEYS)})")
        models = p.get("models")
        if not isinstance(models, list) or len(models) < 2 or len(set(models)) != len(models):
            self._err(f"probe.models must list two or more distinct models, got {models!r}")
        for m in models:
            if m not in self.models:
                self._err(f"probe.models names unknown model {m!r}")
        for key in ("prompts", "contrast"):
            if key in p and not self.resolve(p[key]).is_file():
                self._err(f"probe.{key} {p[key]!r} does not exist")
        if "prompts" not in p:
            self._err("[probe] needs 'prompts'")
        _layer_list(p.get("layers"), "probe", self._err)
        if "adapter" in p and p["adapter"] not in self.adapters:
            self._err(f"probe.adapter names unknown adapter {p['adapter']!r}")
        if "adapter_on" in p and ("adapter" not in p or p["adapter_on"] not in models):
            self._err(f"probe.adapter_on needs 'adapter' and must be one of probe.models, got {p['adapter_on']!r}")
        for key in ("batch_size", "permutations"):
            v = p.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                self._err(f"probe.{key} must be a positive integer, got {v!r}")

    def model_order(self) -> list:
        """Model names in dependency order (a model after the models and adapters it needs)."""
        order, state = [], {}

        def visit(name, trail):
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                self._err(f"models form a cycle: {' -> '.join(trail + [name])}")
            state[name] = "visiting"
            m = self.models[name]
            if "from" in m:
                visit(m["from"], trail + [name])
                if "adapter" in m:
                    visit(self.adapters[m["adapter"]]["model"], trail + [name])
            state[name] = "done"
            order.append(name)

        for name in self.models:
            visit(name, [])
        return order

    def identity_models(self) -> list:
        """Conditions plus any extra models named in [identity] models (e.g. the base, to show the scorer
        discriminates)."""
        extra = [m for m in (self.identity or {}).get("models", []) if m not in self.conditions]
        return extra + list(self.conditions)

    def eval_models(self, name: str) -> list:
        return list(self.evals[name].get("models", self.conditions))


def load_spec(path) -> Spec:
    path = Path(path).absolute()
    if not path.is_file():
        raise ReqnoiseError(f"spec file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ReqnoiseError(f"{path}: not valid TOML ({err})") from None
    return Spec(data, path)
