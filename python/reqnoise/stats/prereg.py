"""Pre-registered kill criteria that cannot be moved after the results are in.

Workflow: write the criteria in a TOML file, lock it (``reqnoise preregister criteria.toml --out lock.json``)
*before* producing any result file, then evaluate (``reqnoise verdict lock.json --results DIR``). The verdict
refuses (exit code 2) when the criteria file beside the lock no longer hashes to the locked SHA-256.

Provenance: whether the results came after the lock is read from what was written when they were *computed*,
never from file times (a copy or a cache hit refreshes those). ``reqnoise run`` writes, beside each result file
``X.jsonl``, ``X.provenance.json``: the SHA-256 of the records and, for the step that computed them and every
step upstream of it, the UTC time it was computed, the SHA-256 of the lock file that existed then (null if none)
and the reqnoise version. The verdict still evaluates the criterion, but its first line says the criteria were
NOT pre-registered for these results (and ``Verdict.preregistered`` is False) when a result file has no
provenance (e.g. hand-made records), its records differ from those computed, or any of its steps was computed
with no lock, under another lock, or before this lock's time. (Lock and provenance guard against honest mistakes
and quiet post-hoc edits; they are not a signature against someone who rewrites them on purpose. Commit the
lock, or send its SHA-256 to someone, for that.)

Criteria file (TOML)
--------------------
::

    title = "Set-G knowledge injection"                  # free text fields: any other key is kept as is
    hypothesis = "Set-G content contributes real knowledge"
    success_if = "diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05 and n >= 692"
    alpha = 0.05      # optional: coverage of ci_low/ci_high (1 - alpha) and alpha of paired_mde (default 0.05)
    power = 0.8       # optional: power of paired_mde (default 0.8)

Exactly one rule key:

* ``success_if`` (synonym: ``criterion``): the effect counts as real iff the expression is true; the *kill
  criterion is met* when it is false (the convention of the published study: "contributes real knowledge if
  and only if A1 - A0 >= 5 pp AND p < 0.05 ... otherwise the line is closed").
* ``kill_if``: the kill criterion is met when the expression is true.

Expression language
-------------------
Parsed with Python's ``ast`` module and walked against a strict whitelist; nothing is ever evaluated by
Python. Allowed:

* numbers (``0.05``, ``692``, ``1e-6``); arithmetic ``+ - * /`` and unary minus on numbers;
* comparisons ``< <= > >= == !=`` (chains like ``0 < x < 1`` allowed) giving booleans;
* ``and``, ``or``, ``not`` on booleans; parentheses;
* ``n``: the number of items, which must be the same item set (same ids) in every named condition;
* functions whose arguments are condition names. A condition ``X`` is read from ``DIR/X.jsonl`` (per-item
  records, see ``reqnoise.eval.records``); names are ASCII identifiers not starting with ``_``.

  ==================  ===========================================================================
  ``acc(X)``          accuracy of X (unparsed answers count as wrong), fraction
  ``correct(X)``      number of correct items of X
  ``unparsed(X)``     number of unparsed answers of X
  ``ci_low(X)``       lower end of the Wilson interval of acc(X); ``ci_high(X)`` the upper end
  ``diff(X, Y)``      acc(X) - acc(Y), fraction (0.05 = 5 pp)
  ``z(X, Y)``         pooled two-proportion z statistic, positive when X is more accurate
  ``ztest_p(X, Y)``   two-sided p of that z-test (unpaired; the published study's test)
  ``mcnemar_p(X, Y)`` two-sided exact McNemar p on the paired items
  ``fixed(X, Y)``     items wrong in Y and right in X; ``broken(X, Y)`` right in Y and wrong in X
  ``flip_rate(X, Y)`` (fixed + broken) / n
  ``paired_mde(X, Y)`` smallest paired difference detectable (alpha, power) at a planning flip rate: the upper
                      end of the (1 - alpha) Wilson interval of flip_rate(X, Y), never the observed rate,
                      so it is never 0 (no flips cannot make a design look sensitive)
  ``se(X, Y)``        iid standard error of the paired difference diff(X, Y)
  ``se_clustered(X, Y)`` the same, cluster-robust by subject (error if items lack subjects)
  ==================  ===========================================================================

Rejected with a message naming the position: attribute access, subscripts, strings, keyword arguments,
unknown functions or names (``__import__``, ``open``, ...), lambdas, comprehensions, a number where a
boolean is needed and vice versa. Every function call is evaluated (no short-circuit) so that the verdict
can show every number the criterion depends on.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from reqnoise import __version__, atomic
from reqnoise.errors import RefusedError, ReqnoiseError
from reqnoise.eval.records import read_records
from reqnoise.jsonl import read_json
from reqnoise.stats.inference import compare_paired, pair_records, wilson_ci

LOCK_FORMAT = "reqnoise-prereg-lock/1"
PROVENANCE_FORMAT = "reqnoise-provenance/1"
PROVENANCE_SUFFIX = ".provenance.json"  # X.jsonl -> X.provenance.json
MAX_EXPR_CHARS = 4000
RULE_KEYS = ("success_if", "criterion", "kill_if")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# function -> (arity, Comparison/Arm attribute or callable, description)
UNARY = {"acc": "accuracy", "correct": "correct", "unparsed": "unparsed", "ci_low": None, "ci_high": None}
BINARY = {
    "diff": "difference",
    "z": "z",
    "ztest_p": "ztest_p",
    "mcnemar_p": "mcnemar_p",
    "fixed": "fixed",
    "broken": "broken",
    "flip_rate": "flip_rate",
    "paired_mde": "paired_mde",
    "se": "se_paired",
    "se_clustered": "se_clustered",
}
FUNCTIONS = {**{k: 1 for k in UNARY}, **{k: 2 for k in BINARY}}

_CMP = {
    ast.Lt: ("<", lambda a, b: a < b),
    ast.LtE: ("<=", lambda a, b: a <= b),
    ast.Gt: (">", lambda a, b: a > b),
    ast.GtE: (">=", lambda a, b: a >= b),
    ast.Eq: ("==", lambda a, b: a == b),
    ast.NotEq: ("!=", lambda a, b: a != b),
}
_ARITH = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Node:
    """A checked expression node. kind: num, n, call, neg, arith, cmp, and, or, not."""

    kind: str
    type: str  # "num" or "bool"
    text: str  # canonical source text
    value: object = None  # number (num), function name (call), operator callable (arith)
    args: tuple = ()  # child nodes, or condition names (call)
    ops: tuple = ()  # comparison operator symbols (cmp)


class CriteriaSyntaxError(ReqnoiseError):
    """The criterion expression is not in the language (message names the position and the construct)."""


def _where(node, source):
    return f"{source}, column {max(1, getattr(node, 'col_offset', 1))}"


def _convert(node, source) -> Node:
    def fail(msg):
        raise CriteriaSyntaxError(f"{_where(node, source)}: {msg}")

    def need(child, typ):
        c = _convert(child, source)
        if c.type != typ:
            what = "a number" if typ == "num" else "a true/false condition"
            raise CriteriaSyntaxError(f"{_where(child, source)}: {c.text!r} is not {what}")
        return c

    if isinstance(node, ast.Expression):
        return _convert(node.body, source)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            fail(f"only numbers are allowed as literals, not {node.value!r}")
        if not math.isfinite(node.value):
            fail(f"number {node.value!r} is not finite")
        return Node("num", "num", repr(node.value), value=node.value)
    if isinstance(node, ast.Name):
        if node.id == "n":
            return Node("n", "num", "n")
        if node.id in FUNCTIONS:
            fail(f"{node.id} is a function: write {node.id}(...)")
        fail(f"unknown name {node.id!r} (condition names may only appear as arguments, e.g. acc({node.id}))")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            fail("only plain function names can be called")
        fname = node.func.id
        if fname not in FUNCTIONS:
            fail(f"unknown function {fname!r}; known: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords:
            fail(f"{fname}() takes no keyword arguments")
        if len(node.args) != FUNCTIONS[fname]:
            fail(f"{fname}() takes {FUNCTIONS[fname]} condition name(s), got {len(node.args)}")
        conds = []
        for a in node.args:
            if not isinstance(a, ast.Name):
                raise CriteriaSyntaxError(f"{_where(a, source)}: arguments of {fname}() must be condition names")
            if not _NAME.match(a.id) or not a.id.isascii():
                raise CriteriaSyntaxError(
                    f"{_where(a, source)}: bad condition name {a.id!r} (ASCII letters, "
                    "digits and _, starting with a letter)"
                )
            if a.id == "n" or a.id in FUNCTIONS:
                raise CriteriaSyntaxError(f"{_where(a, source)}: {a.id!r} is reserved, not a condition name")
            conds.append(a.id)
        return Node("call", "num", f"{fname}({', '.join(conds)})", value=fname, args=tuple(conds))
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            c = need(node.operand, "bool")
            return Node("not", "bool", f"not {c.text}", args=(c,))
        if isinstance(node.op, ast.USub):
            c = need(node.operand, "num")
            return Node("neg", "num", f"-{c.text}", args=(c,))
        if isinstance(node.op, ast.UAdd):
            return need(node.operand, "num")
        fail(f"operator {type(node.op).__name__} is not allowed")
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _ARITH:
            fail(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        sym = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        left, right = need(node.left, "num"), need(node.right, "num")
        return Node("arith", "num", f"({left.text} {sym} {right.text})", value=type(node.op), args=(left, right))
    if isinstance(node, ast.BoolOp):
        kind = "and" if isinstance(node.op, ast.And) else "or"
        parts = tuple(need(v, "bool") for v in node.values)
        return Node(kind, "bool", "(" + f" {kind} ".join(p.text for p in parts) + ")", args=parts)
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _CMP:
                fail(f"comparison {type(op).__name__} is not allowed (only < <= > >= == !=)")
        operands = (need(node.left, "num"),) + tuple(need(c, "num") for c in node.comparators)
        syms = tuple(_CMP[type(op)][0] for op in node.ops)
        text = operands[0].text + "".join(f" {s} {o.text}" for s, o in zip(syms, operands[1:]))
        return Node("cmp", "bool", text, args=operands, ops=syms)
    fail(f"{type(node).__name__} is not allowed in a criterion")


def parse_expression(text: str, source: str = "criterion") -> Node:
    """Parse and type-check a criterion; the result must be a true/false condition."""
    if not isinstance(text, str):
        raise CriteriaSyntaxError(f"{source}: expected a string expression, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise CriteriaSyntaxError(f"{source}: expression longer than {MAX_EXPR_CHARS} characters")
    if not text.strip():
        raise CriteriaSyntaxError(f"{source}: empty expression")
    # One logical line whatever the TOML string's layout; the wrapping "(" makes col_offset 1-based.
    flat = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    try:
        tree = ast.parse("(" + flat + ")", mode="eval")
    except SyntaxError as err:
        col = max(1, (err.offset or 1) - 1)
        raise CriteriaSyntaxError(f"{source}, column {col}: syntax error ({err.msg})") from None
    except (ValueError, RecursionError, MemoryError) as err:
        raise CriteriaSyntaxError(f"{source}: cannot parse ({type(err).__name__})") from None
    try:
        root = _convert(tree, source)
    except RecursionError:
        raise CriteriaSyntaxError(f"{source}: expression nested too deeply") from None
    if root.type != "bool":
        raise CriteriaSyntaxError(f"{source}: {root.text!r} is a number, not a true/false condition")
    return root


def conditions_of(node: Node) -> list[str]:
    """Condition names used anywhere in the expression, sorted."""
    out = set()
    stack = [node]
    while stack:
        nd = stack.pop()
        if nd.kind == "call":
            out.update(nd.args)
        else:
            stack.extend(a for a in nd.args if isinstance(a, Node))
    return sorted(out)


# ---------------------------------------------------------------- criteria files


@dataclass
class Criteria:
    """A parsed criteria file."""

    rule: str  # "success_if" or "kill_if"
    expression: str
    tree: Node
    conditions: list
    alpha: float
    power: float
    fields: dict  # every key of the TOML file


def parse_criteria(text: str, source: str = "criteria") -> Criteria:
    """Parse the TOML text of a criteria file (format in the module docstring)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ReqnoiseError(f"{source}: not valid TOML ({err})") from None
    present = [k for k in RULE_KEYS if k in data]
    if len(present) != 1:
        raise ReqnoiseError(
            f"{source}: need exactly one of success_if (or criterion) / kill_if, found {present or 'none'}"
        )
    key = present[0]
    rule = "kill_if" if key == "kill_if" else "success_if"
    expr = data[key]
    tree = parse_expression(expr, f"{source}: {key}")
    settings = {}
    for name, default, lo, hi in (("alpha", 0.05, 0, 1), ("power", 0.8, 0, 1)):
        v = data.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi:
            raise ReqnoiseError(f"{source}: field {name!r} must be a number in ({lo}, {hi}), got {v!r}")
        settings[name] = float(v)
    conds = conditions_of(tree)
    if not conds:
        raise ReqnoiseError(f"{source}: {key} names no condition; it cannot depend on any result")
    return Criteria(rule, expr, tree, conds, settings["alpha"], settings["power"], data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc_now() -> datetime:
    return datetime.now(UTC)


def lock_criteria(criteria_path, out_path, overwrite: bool = False) -> dict:
    """Validate a criteria file and write a lock (JSON, atomically) holding its text, SHA-256, the path of
    the criteria file relative to the lock's directory, and the UTC time. Refuses to replace an existing lock
    unless ``overwrite``. Returns the lock as a dict."""
    criteria_path = Path(criteria_path)
    out_path = Path(out_path)
    if not criteria_path.is_file():
        raise ReqnoiseError(f"criteria file {criteria_path} does not exist")
    if out_path.exists() and not overwrite:
        raise ReqnoiseError(f"{out_path} already exists (pass --overwrite / overwrite=True to replace it)")
    raw = criteria_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ReqnoiseError(f"criteria file {criteria_path} is not UTF-8") from None
    crit = parse_criteria(text, str(criteria_path))
    lock_dir = out_path.absolute().parent
    lock = {
        "format": LOCK_FORMAT,
        "criteria_path": os.path.relpath(criteria_path.absolute(), lock_dir),
        "criteria_sha256": _sha256(raw),
        "criteria_text": text,
        "rule": crit.rule,
        "expression": crit.expression,
        "conditions": crit.conditions,
        "locked_at": _utc_now().isoformat(timespec="microseconds"),
        "reqnoise_version": __version__,
    }
    atomic.write_text(out_path, json.dumps(lock, indent=2, ensure_ascii=False) + "\n", overwrite=overwrite)
    return lock


# ---------------------------------------------------------------- provenance


def lock_sha256(lock_path) -> str:
    """SHA-256 of a lock file's bytes: names one lock (the same criteria locked twice give two locks)."""
    return _sha256(Path(lock_path).read_bytes())


def step_provenance(lock_sha: str | None) -> dict:
    """What a step records when it is computed: UTC time, the SHA-256 of the lock that existed then (None if
    none) and the reqnoise version. Written once, with the step's outputs; never refreshed."""
    return {
        "computed_at": _utc_now().isoformat(timespec="microseconds"),
        "lock_sha256": lock_sha,
        "reqnoise_version": __version__,
    }


def provenance_path(records_path) -> Path:
    """``DIR/X.jsonl`` -> ``DIR/X.provenance.json``."""
    records_path = Path(records_path)
    return records_path.with_name(records_path.name.removesuffix(".jsonl") + PROVENANCE_SUFFIX)


def write_provenance(records_path, steps: dict) -> None:
    """Write the provenance beside a result file. ``steps``: step name -> ``step_provenance`` dict as recorded
    when that step was computed (the step that computed the records and every step upstream of it)."""
    records_path = Path(records_path)
    doc = {
        "format": PROVENANCE_FORMAT,
        "records": records_path.name,
        "records_sha256": _sha256(records_path.read_bytes()),
        "steps": steps,
    }
    atomic.write_text(provenance_path(records_path), json.dumps(doc, indent=2) + "\n", overwrite=True)


def provenance_problem(records_path, lock_sha: str, locked_at: datetime) -> str | None:
    """Why ``records_path`` cannot count as computed under the lock (``lock_sha``, written at ``locked_at``),
    or None when its provenance shows every step computed under that lock."""
    records_path = Path(records_path)
    side = provenance_path(records_path)
    name = records_path.name
    if not side.is_file():
        return f"{name}: no provenance ({side.name} missing), so nothing shows it was computed after the lock"
    try:
        doc = read_json(side, "provenance file")
        if doc.get("format") != PROVENANCE_FORMAT or not isinstance(doc.get("steps"), dict) or not doc["steps"]:
            raise ReqnoiseError("not a provenance file")
        if doc.get("records_sha256") != _sha256(records_path.read_bytes()):
            return f"{name}: its records are not the ones computed ({side.name} names other bytes)"
        bad = []
        for step, p in doc["steps"].items():
            if p is None:  # a step whose record predates provenance
                bad.append(f"{step} has no recorded provenance")
                continue
            at = datetime.fromisoformat(p["computed_at"])
            if p.get("lock_sha256") is None:
                bad.append(f"{step} computed {p['computed_at']} with no lock")
            elif p["lock_sha256"] != lock_sha:
                bad.append(f"{step} computed {p['computed_at']} under another lock ({p['lock_sha256'][:12]}...)")
            elif at.tzinfo is None:
                bad.append(f"{step} computed at a time without a time zone ({p['computed_at']})")
            elif at < locked_at:
                bad.append(f"{step} computed {p['computed_at']}, before the lock")
    except (ReqnoiseError, KeyError, TypeError, ValueError, AttributeError):
        return f"{name}: unreadable provenance in {side.name}"
    return f"{name}: " + "; ".join(bad) if bad else None


# ---------------------------------------------------------------- verdict


@dataclass
class Check:
    """One comparison of the criterion with the numbers it compared."""

    text: str
    values: list
    ops: list
    result: bool


@dataclass
class Verdict:
    """Outcome of a locked criterion. ``met`` is True when the kill criterion is met."""

    met: bool
    rule: str
    expression: str
    expression_value: bool
    n: int
    numbers: dict  # canonical text ("diff(A1, A0)", "n") -> value
    checks: list
    accuracies: dict  # condition -> accuracy, for context
    text: str
    lock: dict = field(repr=False, default_factory=dict)
    preregistered: bool = True  # False: some result was not computed under this lock (see ``provenance``)
    provenance: list = field(default_factory=list)  # one line per result file whose provenance fails


def _read_lock(lock_path: Path) -> dict:
    lock = read_json(lock_path, "lock file")
    if lock.get("format") != LOCK_FORMAT:
        raise ReqnoiseError(f"lock file {lock_path}: not a {LOCK_FORMAT} lock")
    for key in ("criteria_path", "criteria_sha256", "criteria_text", "locked_at"):
        if not isinstance(lock.get(key), str):
            raise RefusedError(f"lock file {lock_path}: field {key!r} missing or not a string")
    return lock


def verify_lock(lock_path) -> tuple[dict, Criteria, datetime]:
    """Check that the lock is intact and the criteria file beside it is unchanged; refuse (RefusedError,
    exit 2) otherwise. Returns (lock, parsed locked criteria, lock time)."""
    lock_path = Path(lock_path)
    lock = _read_lock(lock_path)
    sha = lock["criteria_sha256"]
    if _sha256(lock["criteria_text"].encode("utf-8")) != sha:
        raise RefusedError(
            f"lock file {lock_path}: its criteria text no longer matches its SHA-256 (the lock was edited)"
        )
    crit_path = lock_path.absolute().parent / lock["criteria_path"]
    if not crit_path.is_file():
        raise RefusedError(f"criteria file {crit_path} named by lock {lock_path} is missing; cannot verify it")
    now_sha = _sha256(crit_path.read_bytes())
    if now_sha != sha:
        raise RefusedError(
            f"criteria file {crit_path} changed after it was locked at {lock['locked_at']} "
            f"(SHA-256 now {now_sha[:12]}..., locked {sha[:12]}...)"
        )
    try:
        locked_at = datetime.fromisoformat(lock["locked_at"])
    except ValueError:
        raise RefusedError(f"lock file {lock_path}: bad locked_at {lock['locked_at']!r}") from None
    if locked_at.tzinfo is None:
        raise RefusedError(f"lock file {lock_path}: locked_at {lock['locked_at']!r} has no time zone")
    return lock, parse_criteria(lock["criteria_text"], f"locked criteria {crit_path}"), locked_at


class _Env:
    """Values of the criterion's functions on item-aligned results."""

    def __init__(self, paired, crit: Criteria):
        self.paired, self.crit = paired, crit
        self.n = len(paired.ids)
        self._cache = {}

    def comparison(self, x, y):

        if (x, y) not in self._cache:  # reference Y, condition X: difference = acc(X) - acc(Y)
            self._cache[x, y] = compare_paired(self.paired, y, x, self.crit.alpha, self.crit.power)
        return self._cache[x, y]

    def call(self, fname, args):

        if fname in UNARY:
            k = int(self.paired.correct[args[0]].sum())
            if fname == "acc":
                return k / self.n
            if fname == "correct":
                return k
            if fname == "unparsed":
                return self.paired.unparsed[args[0]]
            lo, hi = wilson_ci(k, self.n, self.crit.alpha)
            return lo if fname == "ci_low" else hi
        value = getattr(self.comparison(*args), BINARY[fname])
        if value is None:
            raise ReqnoiseError(
                f"{fname}({', '.join(args)}) is unavailable: items need a subject in every "
                "record and at least two subjects"
            )
        return value


def _evaluate(node: Node, env: _Env, numbers: dict, checks: list):
    k = node.kind
    if k == "num":
        return node.value
    if k == "n":
        numbers["n"] = env.n
        return env.n
    if k == "call":
        v = env.call(node.value, node.args)
        numbers[node.text] = v
        return v
    vals = [_evaluate(a, env, numbers, checks) for a in node.args]  # no short-circuit: report every number
    if k == "neg":
        return -vals[0]
    if k == "arith":
        if node.value is ast.Div and vals[1] == 0:
            raise ReqnoiseError(f"division by zero in {node.text}")
        return _ARITH[node.value](vals[0], vals[1])
    if k == "not":
        return not vals[0]
    if k == "and":
        return all(vals)
    if k == "or":
        return any(vals)
    if k == "cmp":
        ops = {sym: fn for sym, fn in _CMP.values()}
        result = all(ops[s](a, b) for s, a, b in zip(node.ops, vals, vals[1:]))
        checks.append(Check(node.text, vals, list(node.ops), result))
        return result
    raise AssertionError(k)


def _fmt(v):
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def evaluate_lock(lock_path, results_dir) -> Verdict:
    """Verify a lock (see ``verify_lock``), load ``results_dir/<CONDITION>.jsonl`` for every condition the
    criterion names, check each file's provenance against the lock (``provenance_problem``) and evaluate the
    criterion. Raises RefusedError (exit 2) for a changed criteria file or lock. Results not computed under
    the lock are still evaluated, but the verdict's first line says the criteria were NOT pre-registered for
    them and ``preregistered`` is False."""
    lock, crit, locked_at = verify_lock(lock_path)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReqnoiseError(f"results directory {results_dir} does not exist")
    files = {name: results_dir / f"{name}.jsonl" for name in crit.conditions}
    for name, path in files.items():
        if not path.is_file():
            raise ReqnoiseError(f"no result file for condition {name}: {path} does not exist")
    sha = lock_sha256(lock_path)
    problems = [p for path in files.values() if (p := provenance_problem(path, sha, locked_at)) is not None]
    paired = pair_records({name: read_records(path) for name, path in files.items()})
    env = _Env(paired, crit)
    numbers, checks = {}, []
    value = bool(_evaluate(crit.tree, env, numbers, checks))
    met = (not value) if crit.rule == "success_if" else value
    acc = {name: float(paired.correct[name].mean()) for name in crit.conditions}

    w = max(len(t) for t in numbers)
    lines = []
    if problems:
        lines.append(
            f"NOT pre-registered: the criteria were NOT pre-registered for {len(problems)} of {len(files)} "
            "result file(s); this verdict is post hoc"
        )
        lines += [f"  {p}" for p in problems]
    lines += [
        f"criteria: {lock_path} -> {lock['criteria_path']} (SHA-256 {lock['criteria_sha256'][:16]}..., "
        f"locked {lock['locked_at']})",
        f"{crit.rule}: {' '.join(crit.expression.split())}",
        f"results: {results_dir} ({', '.join(p.name for p in files.values())}), n = {env.n} paired items",
        "numbers:",
    ]
    lines += [f"  {t:<{w}} = {_fmt(v)}" for t, v in numbers.items()]
    lines.append("checks:")
    for c in checks:
        shown = _fmt(c.values[0]) + "".join(f" {s} {_fmt(v)}" for s, v in zip(c.ops, c.values[1:]))
        lines.append(f"  {c.text}: {shown} -> {'true' if c.result else 'false'}")
    lines.append(
        f"{crit.rule} is {'true' if value else 'false'} -> "
        + ("kill criterion met" if met else "kill criterion not met")
        + (" (post hoc: NOT pre-registered)" if problems else "")
    )
    return Verdict(
        met=met,
        rule=crit.rule,
        expression=crit.expression,
        expression_value=value,
        n=env.n,
        numbers=numbers,
        checks=checks,
        accuracies=acc,
        text="\n".join(lines) + "\n",
        lock=lock,
        preregistered=not problems,
        provenance=problems,
    )
