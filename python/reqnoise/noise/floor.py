"""The requantization floor of a target choice: how many eval answers a zero-delta fuse of a group of modules
moves, before anything is trained.

For each group (module type and layer band, one layer, or an adapter directory's modules) the group's quantized
tensors are requantized with a zero delta by the native kernel (``fuse_quantized``; ``fresh`` is what mlx-lm's
fuse does, ``keep-grid`` keeps every group's scale and bias) and swapped into the one loaded model, the items are
scored (``reqnoise.eval.multiple_choice``), and the original tensors are put back. Nothing is written to disk per
group, so a sweep of ten groups costs ten evaluations, not ten model writes. A copy whose every swapped tensor
is bit for bit the original (keep-grid's zero delta) is the unfused model: its row takes the unfused model's
records and a KL of 0 without scoring the items again.

Per (group, requant) row: answers changed, wrong-to-right (``fixed``) and right-to-wrong (``broken``) flips
against the unfused model, the accuracy change with its paired CI and exact McNemar p
(``stats.inference.compare``), the "Set-G gain" (the share of the items the unfused model gets wrong that the
fused copy gets right, with the paired CI and McNemar p on those items), the share of codes changed, and the
mean KL(unfused || fused) of the full next-token distribution where the answer starts.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.options import FuseOptions
from reqnoise.kernel.formats import KERNEL_REQUANTS

# The groups a name stands for: relative module paths (inside a block) matched by kind.
KINDS = ("attention", "experts", "router", "all-linear")
DEFAULT_GROUPS = ("attention", "experts", "router", "all-linear")
CALIBRATIONS = ("none", "own", "shared")
EVAL_MODES = ("loglik", "cloze")
ROUTER_NAMES = ("mlp.gate", "mlp.router", "block_sparse_moe.gate")

# The requant choices a zero-delta fuse can differ in. "calibrated" is left out: with a zero delta it returns the
# input bit for bit by construction (its floor is keep-grid's zero), and it needs calibration activations.
FLOOR_REQUANTS = tuple(r for r in KERNEL_REQUANTS if r != "calibrated")


@dataclass
class Group:
    """A named set of full module paths (quantized modules only: a zero delta leaves a float module as is)."""

    name: str
    modules: list


@dataclass
class FloorRow:
    """One group under one requant mode, against the unfused model on the same n items (fractions)."""

    group: str
    requant: str
    modules: int
    n: int
    changed: int  # predictions that differ from the unfused model's
    fixed: int  # unfused wrong -> fused right
    broken: int  # unfused right -> fused wrong
    accuracy: float
    difference: float  # accuracy change, fused - unfused
    difference_ci: tuple
    mcnemar_p: float
    wrong_n: int  # items the unfused model gets wrong
    setg_gain: float | None  # fixed / wrong_n: the "gain" of requantization alone on those items
    setg_gain_ci: tuple | None
    setg_gain_p: float | None  # exact McNemar (fixed vs 0 broken) on those items
    codes_changed: float | None  # share of the group's codes that differ (None: the width changed)
    kl: float | None  # mean KL(unfused || fused), nats, next token where the answer starts
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FloorReport:
    model: str
    items: str
    n: int
    accuracy: float  # the unfused model's
    eval_mode: str
    calibrate: str
    options: dict
    rows: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = [r.to_dict() if isinstance(r, FloorRow) else r for r in self.rows]
        return out


# ------------------------------------------------------------------------------------------------ groups


def _layer(path: str):
    m = re.search(r"layers\.(\d+)\.", path)
    return None if m is None else int(m.group(1))


def _relative(path: str) -> str:
    m = re.search(r"layers\.\d+\.", path)
    return path[m.end() :] if m else path


def _kind_of(path: str, module) -> str | None:
    rel = _relative(path)
    if hasattr(module, "num_experts"):
        return "experts"
    if rel in ROUTER_NAMES:
        return "router"
    if ".self_attn." in "." + rel or rel.startswith("attention.") or ".attn." in "." + rel:
        return "attention"
    return None


def _quantized_modules(model) -> dict:
    """Full path -> module for every affine-quantized adaptable module inside the blocks."""
    from reqnoise.train.targets import adaptable_modules

    return {
        p: m
        for p, m in adaptable_modules(model).items()
        if _layer(p) is not None and hasattr(m, "scales") and getattr(m, "mode", "affine") == "affine"
    }


def _parse_layers(text: str, name: str) -> list:
    """``8,14,20`` or ``1-3`` (or a mix, ``0,2-3``) -> sorted layer indices."""
    out = set()
    try:
        for part in (x.strip() for x in text.split(",")):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise ReqnoiseError(f"group {name!r}: layers must be like @8,14,20 or @1-3, got {text!r}") from None
    if not out:
        raise ReqnoiseError(f"group {name!r}: no layer after @")
    return sorted(out)


def resolve_groups(model, names) -> list[Group]:
    """The module paths of each group name (see ``reqnoise floor --help``); refuses an unknown or empty group.

    A name is ``KIND[.SUFFIX][@LAYERS]`` (KIND one of ``attention``, ``experts``, ``router``, ``all-linear``;
    SUFFIX a module name such as ``down_proj``; LAYERS ``8,14,20`` or ``1-3``), ``layer:N``, ``per-layer`` (one
    group per block), or an adapter directory (its modules)."""
    mods = _quantized_modules(model)
    n_layers = len(getattr(model, "layers", [])) or 1 + max(_layer(p) for p in mods)
    groups: list[Group] = []
    for name in names:
        path = Path(name)
        if path.is_dir() or "/" in name:
            groups.append(_adapter_group(name, mods))
            continue
        if name == "per-layer":
            groups += [Group(f"layer:{i}", sorted(p for p in mods if _layer(p) == i)) for i in range(n_layers)]
            continue
        m = re.fullmatch(r"layer:(\d+)", name)
        if m:
            kind, suffix, layers = "all-linear", None, [int(m.group(1))]
        else:
            m = re.fullmatch(r"([a-z-]+)(?:\.([A-Za-z0-9_.]+))?(?:@([0-9,\- ]+))?", name)
            if m is None or m.group(1) not in KINDS:
                raise ReqnoiseError(
                    f"unknown group {name!r}: expected one of {', '.join(KINDS)} (optionally .MODULE and "
                    "@LAYERS, e.g. experts.down_proj@8,14,20), layer:N, per-layer, or an adapter directory"
                )
            kind, suffix = m.group(1), m.group(2)
            layers = None if m.group(3) is None else _parse_layers(m.group(3), name)
        bad = [i for i in layers or [] if not 0 <= i < n_layers]
        if bad:
            raise ReqnoiseError(f"group {name!r}: layers {bad} do not exist (the model has {n_layers} blocks)")
        sel = [
            p
            for p, mod in mods.items()
            if (kind == "all-linear" or _kind_of(p, mod) == kind)
            and (layers is None or _layer(p) in layers)
            and (suffix is None or p.endswith("." + suffix))
        ]
        if not sel:
            raise ReqnoiseError(f"group {name!r} matches no quantized module of the model")
        groups.append(Group(name, sorted(sel, key=lambda p: (_layer(p), p))))
    return groups


def _adapter_group(name: str, mods: dict) -> Group:
    from reqnoise.fuse.adapters import load_adapter

    adapter = load_adapter(name)
    paths = sorted(adapter.modules)
    unknown = [p for p in paths if p not in mods]
    sel = [p for p in paths if p in mods]
    if not sel:
        raise ReqnoiseError(
            f"adapter {name}: none of its {len(paths)} modules is a quantized module of the model"
            + (f" (e.g. {unknown[0]!r})" if unknown else "")
        )
    return Group(name, sorted(sel, key=lambda p: (_layer(p), p)))


# --------------------------------------------------------------------------------------------- swapping


def zero_delta(module, options: FuseOptions) -> dict:
    """The module's (weight, scales, biases, bits, group_size) after a zero-delta fuse under ``options``."""
    from reqnoise.kernel.op import fuse_quantized

    fresh = options.requant == "fresh"
    out_bits = options.out_bits if fresh and options.out_bits else None
    wq, s, b = fuse_quantized(
        module.weight,
        module.scales,
        module.biases,
        group_size=module.group_size,
        bits=module.bits,
        requant=options.requant,
        out_bits=out_bits,
    )
    return dict(weight=wq, scales=s, biases=b, bits=out_bits or module.bits, group_size=module.group_size)


def _swap(module, state: dict) -> dict:
    old = {k: getattr(module, k) for k in state}
    for k, v in state.items():
        setattr(module, k, v)
    return old


def _same_state(old: dict, new: dict) -> bool:
    """Whether a swap left every array of the module bit for bit as it was (and every other field equal)."""
    import mlx.core as mx

    for k, v in new.items():
        o = old[k]
        if isinstance(v, mx.array) or isinstance(o, mx.array):
            if not (isinstance(v, mx.array) and isinstance(o, mx.array)):
                return False
            if v.dtype != o.dtype or v.shape != o.shape or not mx.array_equal(v, o).item():
                return False
        elif v != o:
            return False
    return True


def _codes(wq, bits, group):
    from reqnoise.noise.report import _codes as codes

    return codes(wq, bits, group)


def _codes_changed(old: dict, new: dict):
    """(changed, total) codes of one module; None when the width changed (codes are not comparable)."""
    import mlx.core as mx

    if new["bits"] != old["bits"]:
        return None
    a = _codes(old["weight"], old["bits"], old["group_size"])
    b = _codes(new["weight"], new["bits"], new["group_size"])
    return int(mx.sum(a != b).item()), int(a.size)


# ------------------------------------------------------------------------------------------- evaluation


def _kl_prompts(plan, limit: int) -> list:
    """Per item (the first ``limit``), the tokens up to where its answer starts (the first scored position)."""
    out = []
    for sc in plan.work[:limit]:
        row, pos, _ = sc.queries[0][0]
        out.append(list(sc.rows[row][: pos + 1]))
    return out


def next_token_logprobs(model, prompts, batch_size: int = 16):
    """float64 [len(prompts), vocab]: log-softmax of the next token after each prompt (right-padded batches)."""
    import mlx.core as mx
    import numpy as np

    from reqnoise.eval.multiple_choice import _head

    head = _head(model)
    out = []
    for b0 in range(0, len(prompts), batch_size):
        rows = prompts[b0 : b0 + batch_size]
        x = np.zeros((len(rows), max(map(len, rows))), dtype=np.int32)
        for i, r in enumerate(rows):
            x[i, : len(r)] = r
        ri = mx.array(np.arange(len(rows), dtype=np.int32))
        pi = mx.array(np.array([len(r) - 1 for r in rows], dtype=np.int32))
        if head is not None:
            logits = head(model.model(mx.array(x))[ri, pi])
        else:
            logits = model(mx.array(x))[ri, pi]
        logits = logits.astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def _kl(p_log, q_log) -> float:
    import numpy as np

    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))


class _Evaluator:
    """The items' plan, fixed once; records (calibrated as asked) of the model as it is loaded now."""

    def __init__(self, model, tokenizer, items, *, mode, batch_size, calibrate, kl_items):
        from reqnoise.eval.multiple_choice import plan_eval

        self.model, self.tokenizer = model, tokenizer
        self.plan = plan_eval(tokenizer, items, mode=mode, batch_size=batch_size)
        self.calibrate = calibrate
        self.kl_prompts = _kl_prompts(self.plan, kl_items)
        self.prior = None

    def records(self, progress=False):
        from reqnoise.eval.calibration import calibrate_records
        from reqnoise.eval.multiple_choice import run_plan

        res = run_plan(self.model, self.tokenizer, self.plan, progress=progress)
        recs = [self.plan.record(i, res[i]) for i in range(len(self.plan.items))]
        if self.calibrate == "none":
            return recs
        return calibrate_records(recs, prior=self.prior if self.calibrate == "shared" else None)

    def logprobs(self):
        return next_token_logprobs(self.model, self.kl_prompts)


def floor_row(group: Group, requant: str, base_recs, recs, codes, kl, seconds) -> FloorRow:
    """A row from the unfused and fused records (paired by id)."""
    from reqnoise.stats.inference import compare, mcnemar, paired_difference_ci

    c = compare(base_recs, recs)
    by_id = {r["id"]: r for r in recs}
    changed = sum(by_id[r["id"]]["prediction"] != r["prediction"] for r in base_recs)
    wrong = [r["id"] for r in base_recs if not (r["correct"] and r["parsed"])]
    gained = sum(bool(by_id[i]["correct"] and by_id[i]["parsed"]) for i in wrong)
    if wrong:
        # On items the unfused model gets wrong nothing can break: the paired table is (gained, 0, 0, rest).
        gain = gained / len(wrong)
        gain_ci = paired_difference_ci(gained, 0, 0, len(wrong) - gained)
        gain_p = mcnemar(gained, 0)
    else:
        gain = gain_ci = gain_p = None
    return FloorRow(
        group=group.name,
        requant=requant,
        modules=len(group.modules),
        n=c.n,
        changed=int(changed),
        fixed=c.fixed,
        broken=c.broken,
        accuracy=c.b.accuracy,
        difference=c.difference,
        difference_ci=tuple(c.difference_ci),
        mcnemar_p=c.mcnemar_p,
        wrong_n=len(wrong),
        setg_gain=gain,
        setg_gain_ci=None if gain_ci is None else tuple(gain_ci),
        setg_gain_p=gain_p,
        codes_changed=codes,
        kl=kl,
        seconds=round(seconds, 3),
    )


def floor_loaded(
    model,
    tokenizer,
    items,
    groups,
    *,
    requants=FLOOR_REQUANTS,
    out_bits=None,
    mode: str = "loglik",
    batch_size: int = 8,
    calibrate: str = "none",
    kl_items: int = 64,
    prior_records=None,
    progress: bool = True,
    model_name: str = "",
    items_name: str = "",
    prior_name: str = "",
) -> FloorReport:
    """The floor of each group on an already loaded mlx-lm model (left as it was on return, also on error).

    Args:
        items: path, ``Item``s or item dicts (scored with ``mode``: loglik or cloze).
        groups: group names (``resolve_groups``).
        requants: the kernel's requant modes to run (``FLOOR_REQUANTS``).
        out_bits: fresh rows re-quantize at this width (``FuseOptions.out_bits``).
        calibrate: ``none``; ``own`` (each copy's records with their own mean option prior, as a spec's
            ``calibrate = true``); ``shared`` (every copy with the unfused model's prior).
        kl_items: the output KL is read on the first this many items.
        prior_records: with ``shared``, the prior comes from these records (dicts with ``option_logprobs``,
            e.g. the unfused model's records of the eval a Set G was built from, so that the unfused model
            answers the items as it did there; ``floor`` reads them from a JSONL path) instead of from the
            unfused model's records of ``items``; ``prior_name`` says where they came from in the report.
    """
    from tqdm import tqdm

    from reqnoise.eval.items import as_items

    t0 = time.perf_counter()
    if mode not in EVAL_MODES:
        raise ReqnoiseError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}")
    if calibrate not in CALIBRATIONS:
        raise ReqnoiseError(f"calibrate must be one of {CALIBRATIONS}, got {calibrate!r}")
    requants = list(dict.fromkeys(requants))
    bad = [r for r in requants if r not in FLOOR_REQUANTS]
    if bad or not requants:
        raise ReqnoiseError(f"requant must be among {FLOOR_REQUANTS}, got {requants}")
    for r in requants:
        FuseOptions(requant=r, out_bits=out_bits if r == "fresh" else None, control="zero").check()
    items = as_items(items)
    if not items:
        raise ReqnoiseError("no items to evaluate")
    resolved = resolve_groups(model, groups)
    ev = _Evaluator(model, tokenizer, items, mode=mode, batch_size=batch_size, calibrate=calibrate, kl_items=kl_items)
    if prior_records is not None and calibrate != "shared":
        raise ReqnoiseError(f"a prior from other records needs calibrate = 'shared', got {calibrate!r}")
    if calibrate == "shared":
        from reqnoise.eval.calibration import option_prior

        if prior_records is None:
            ev.calibrate = "none"
            prior_records = ev.records()
            ev.calibrate = "shared"
        else:
            prior_name = prior_name or "records given"
        ev.prior = option_prior(prior_records)
    base_recs = ev.records(progress=progress)
    base_lp = ev.logprobs()
    report = FloorReport(
        model=str(model_name),
        items=str(items_name),
        n=len(base_recs),
        accuracy=sum(bool(r["correct"] and r["parsed"]) for r in base_recs) / len(base_recs),
        eval_mode=mode,
        calibrate=f"{calibrate} (prior from {prior_name})" if prior_name else calibrate,
        options={"requants": requants, "out_bits": out_bits},
    )
    named = dict(model.named_modules())
    bar = tqdm(total=len(resolved) * len(requants), desc="floor", unit="copy", disable=not progress, leave=False)
    for group in resolved:
        for requant in requants:
            t1 = time.perf_counter()
            opts = FuseOptions(requant=requant, out_bits=out_bits if requant == "fresh" else None, control="zero")
            saved, changed, total, comparable, same = [], 0, 0, True, True
            try:
                for path in group.modules:
                    mod = named[path]
                    new = zero_delta(mod, opts)
                    old = _swap(mod, new)
                    saved.append((mod, old))
                    same = same and _same_state(old, new)
                    cc = _codes_changed(old, new)
                    if cc is None:
                        comparable = False
                    else:
                        changed, total = changed + cc[0], total + cc[1]
                if same:  # every tensor as it was (keep-grid's zero delta): the model's own records, KL 0
                    recs, kl = base_recs, (0.0 if len(base_lp) else None)
                else:
                    recs = ev.records()
                    kl = _kl(base_lp, ev.logprobs()) if len(base_lp) else None
            finally:
                for mod, old in reversed(saved):
                    _swap(mod, old)
            codes = changed / total if comparable and total else None
            report.rows.append(floor_row(group, requant, base_recs, recs, codes, kl, time.perf_counter() - t1))
            bar.set_postfix_str(group.name)
            bar.update(1)
    bar.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def floor(model, items, groups=DEFAULT_GROUPS, **kw) -> FloorReport:
    """Load ``model`` (an mlx-lm model directory) and measure the floor of ``groups`` on ``items`` (a JSONL
    path or items); see ``floor_loaded``. Inputs are checked before the model is loaded."""
    from reqnoise.eval.items import load_items
    from reqnoise.eval.multiple_choice import load_model

    items_name = ""
    if isinstance(items, (str, Path)):
        path = Path(items)
        if not path.is_file():
            raise ReqnoiseError(f"items file {path} does not exist")
        items_name, items = str(path), load_items(path)
    prior = kw.get("prior_records")
    if isinstance(prior, (str, Path)):  # read before the model loads, so a bad file costs no load
        from reqnoise.eval.records import read_records

        if not Path(prior).is_file():
            raise ReqnoiseError(f"prior records file {prior} does not exist")
        kw.update(prior_records=read_records(prior), prior_name=str(prior))
    net, tok = load_model(model)
    return floor_loaded(net, tok, items, groups, model_name=str(model), items_name=items_name, **kw)


# ------------------------------------------------------------------------------------------------ output


def _pp(x, signed=True):
    return "-" if x is None else f"{100 * x:{'+' if signed else ''}.1f}"


def render_table(report: FloorReport | dict) -> str:
    """The rows as a fixed-width table (pp: percentage points; CIs paired, 95%)."""
    rep = report.to_dict() if isinstance(report, FloorReport) else report
    lines = [
        f"unfused: accuracy {100 * rep['accuracy']:.1f}% on {rep['n']} items ({rep['eval_mode']}, calibrate "
        f"{rep['calibrate']})",
        f"{'group':28s} {'requant':9s} {'mods':>4s} {'changed':>7s} {'w->r':>5s} {'r->w':>5s} "
        f"{'acc change pp [CI]':>22s} {'p':>7s} {'gain on wrong pp [CI]':>24s} {'p':>7s} {'codes':>6s} {'KL':>8s}",
    ]
    for r in rep["rows"]:
        ci = r["difference_ci"]
        acc = f"{_pp(r['difference'])} [{_pp(ci[0])}, {_pp(ci[1])}]"
        if r["setg_gain"] is None:
            gain, gp = "-", "-"
        else:
            gci = r["setg_gain_ci"]
            gain = f"{_pp(r['setg_gain'])} [{_pp(gci[0])}, {_pp(gci[1])}] /{r['wrong_n']}"
            gp = f"{r['setg_gain_p']:.2g}"
        codes = "-" if r["codes_changed"] is None else f"{100 * r['codes_changed']:.1f}%"
        kl = "-" if r["kl"] is None else f"{r['kl']:.2g}"
        lines.append(
            f"{r['group'][:28]:28s} {r['requant']:9s} {r['modules']:>4d} {r['changed']:>7d} {r['fixed']:>5d} "
            f"{r['broken']:>5d} {acc:>22s} {r['mcnemar_p']:>7.2g} {gain:>24s} {gp:>7s} {codes:>6s} {kl:>8s}"
        )
    return "\n".join(lines)


def plot_floor(report: FloorReport | dict, path, overwrite: bool = False) -> None:
    """A PNG bar chart: answers changed, wrong->right and right->wrong per group and requant mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from reqnoise import atomic

    rep = report.to_dict() if isinstance(report, FloorReport) else report
    rows = rep["rows"]
    labels = [f"{r['group']}\n{r['requant']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    for k, (key, label) in enumerate(
        (("changed", "answers changed"), ("fixed", "wrong->right"), ("broken", "right->wrong"))
    ):
        ax.bar(x + (k - 1) * 0.27, [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(f"items (of {rep['n']})")
    ax.set_title("zero-delta fuse: answers moved by requantization alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_file(path, overwrite=overwrite, mode="wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
