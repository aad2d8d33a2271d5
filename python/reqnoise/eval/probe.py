"""Representation probing: did a fine-tune move the persona's representation, and along which direction?

For each model (loaded one at a time) and block, the residual-stream output of that block is read at two
places per prompt: the last prompt token, and the mean over the reply tokens (when the prompts carry a
reply). Per prompt that is one vector per layer and place, never every token: a [N, L, D] array per model.

- centroid: mean of those vectors over the persona prompts (and over the contrast prompts when given);
  persona direction = persona centroid - contrast centroid.
- spread: root mean squared distance of the persona vectors to their centroid (the within-model scale).
- between models A and B, per layer: cosine of their persona directions; ``shift`` = ||c_B - c_A|| / spread_A;
  a linear probe fit on A and tested on B with a permutation p-value.
- with an adapter: the cosine between its per-layer change of the persona centroid and the persona direction.

The linear probe is the closed-form difference-of-means classifier: project on A's persona direction and
threshold at the midpoint of A's two class centroids. It is the question asked ("does A's persona direction
still separate persona from neutral in B?") and it needs no fit: with far fewer prompts than dimensions a
logistic regression separates A's states perfectly along some direction, which would say little about B.
The p-value permutes B's persona/contrast labels (the classifier stays fixed) and counts accuracies at
least the observed one: ``(1 + count) / (1 + permutations)``.

Hidden states come from mlx-lm's own model classes: every block of ``model.layers`` is wrapped by a tap that
calls it unchanged and reduces its output on the fly. Prompts are right-padded in batches; attention is
causal, so the padding after a row's last token never reaches that row's positions, and the reductions
read only positions inside each row.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reqnoise.chat import render_chat
from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import iter_jsonl

PLACES = ("last_prompt", "reply_mean")


def read_probe_prompts(path) -> list[dict]:
    """Prompts for probing: JSONL rows ``{"prompt": str, "reply"?: str, "system"?: str}`` or chat rows
    ``{"messages": [...]}`` (the last assistant message, if last, is the reply). Returns
    ``[{"messages": [...prompt part], "reply": str | None}]``."""
    rows = []
    for _, where, ex in iter_jsonl(Path(path)):
        if isinstance(ex, dict) and isinstance(ex.get("messages"), list) and ex["messages"]:
            msgs = ex["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                raise ReqnoiseError(f"{where}: every message needs a string 'content'")
            reply = msgs[-1]["content"] if msgs[-1].get("role") == "assistant" else None
            rows.append({"messages": msgs[:-1] if reply is not None else msgs, "reply": reply})
        elif isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and ex["prompt"].strip():
            sys_msg = [{"role": "system", "content": ex["system"]}] if isinstance(ex.get("system"), str) else []
            reply = ex.get("reply")
            if reply is not None and not (isinstance(reply, str) and reply.strip()):
                raise ReqnoiseError(f"{where}: 'reply' must be a non-empty string when given")
            rows.append({"messages": sys_msg + [{"role": "user", "content": ex["prompt"]}], "reply": reply})
        else:
            raise ReqnoiseError(f"{where}: expected {{'prompt': str, 'reply'?: str}} or {{'messages': [...]}}")
        if not rows[-1]["messages"]:
            raise ReqnoiseError(f"{where}: no prompt message before the reply")
    if not rows:
        raise ReqnoiseError(f"no prompts in {path}")
    return rows


def _encode(tokenizer, row) -> tuple[list, int]:
    """Tokens of prompt (+ reply) and the prompt's length."""
    head = tokenizer.encode(
        render_chat(tokenizer, row["messages"], add_generation_prompt=True), add_special_tokens=False
    )
    if row["reply"] is None:
        return list(head), len(head)
    msgs = row["messages"] + [{"role": "assistant", "content": row["reply"]}]
    full = tokenizer.encode(render_chat(tokenizer, msgs, add_generation_prompt=False), add_special_tokens=False)
    return list(full), len(head)


class _Tap:
    """Calls a block unchanged and hands its output to ``sink(index, output)``."""

    def __init__(self, block, index: int, sink):
        self.block, self.index, self.sink = block, index, sink

    def __call__(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.sink(self.index, out)
        return out

    def __getattr__(self, name):
        return getattr(self.block, name)


def _block_list(model) -> list:
    """The list object holding the model's blocks (``model.layers`` is a copy in mlx-lm's pipelined models)."""
    for owner in (getattr(model, "model", None), getattr(getattr(model, "language_model", None), "model", None)):
        blocks = getattr(owner, "layers", None)
        if isinstance(blocks, list) and len(blocks) == len(model.layers):
            return blocks
    raise ReqnoiseError(f"cannot find the block list of {type(model).__name__} (model.model.layers)")


def hidden_states(model, tokenizer, rows, layers, *, batch_size: int = 8, progress: bool = True, desc="probe"):
    """Per prompt and layer the block output at the last prompt token and its mean over the reply tokens.

    Returns ``{"last_prompt": [N, len(layers), D], "reply_mean": [N, len(layers), D] or None}`` float32
    (reply_mean is None unless every row has a reply)."""
    import mlx.core as mx
    from tqdm import tqdm

    encoded = [_encode(tokenizer, r) for r in rows]
    with_reply = all(r["reply"] is not None for r in rows)
    blocks = _block_list(model)
    if max(layers) >= len(blocks) or min(layers) < 0:
        raise ReqnoiseError(f"layers {layers} outside the model's {len(blocks)} blocks")
    want = {li: k for k, li in enumerate(layers)}
    last, reply = [], []
    captured = {}

    def sink(i, out):
        if i in want:
            captured[i] = out

    originals = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Tap(originals[i], i, sink)
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = encoded[start : start + batch_size]
            width = max(len(t) for t, _ in chunk)
            arr = np.zeros((len(chunk), width), np.int32)
            for r, (t, _) in enumerate(chunk):
                arr[r, : len(t)] = t
            captured.clear()
            model(mx.array(arr))
            lp = np.array([off - 1 for _, off in chunk])
            rmask = np.zeros((len(chunk), width), np.float32)
            for r, (t, off) in enumerate(chunk):
                rmask[r, off : len(t)] = 1.0
            lp_mx, rm_mx = mx.array(lp), mx.array(rmask)
            per_last, per_reply = [], []
            for li in layers:
                h = captured[li].astype(mx.float32)
                per_last.append(h[mx.arange(h.shape[0]), lp_mx])
                if with_reply:
                    per_reply.append((h * rm_mx[..., None]).sum(axis=1) / rm_mx.sum(axis=1, keepdims=True))
            stacked = mx.stack(per_last, axis=1)
            mx.eval(stacked, *per_reply)
            last.append(np.array(stacked))
            if with_reply:
                reply.append(np.array(mx.stack(per_reply, axis=1)))
    finally:
        for i in range(len(blocks)):
            blocks[i] = originals[i]
    return {
        "last_prompt": np.concatenate(last),
        "reply_mean": np.concatenate(reply) if with_reply else None,
    }


def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def probe_accuracy(direction, threshold: float, pos, neg) -> float:
    """Share of ``pos`` [n, D] and ``neg`` [m, D] on their side of ``x @ direction = threshold``."""
    return float(((pos @ direction > threshold).sum() + (neg @ direction <= threshold).sum()) / (len(pos) + len(neg)))


def permutation_pvalue(direction, threshold, pos, neg, *, permutations: int = 10000, seed: int = 0) -> float:
    """One-sided permutation p-value of the fixed classifier's accuracy: labels of pos/neg shuffled."""
    x = np.concatenate([pos, neg]) @ direction > threshold
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    observed = np.mean(x == labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    count = sum(np.mean(x == rng.permutation(labels)) >= observed - 1e-12 for _ in range(permutations))
    return (1 + count) / (1 + permutations)


@dataclass
class ModelStates:
    """What ``probe_models`` keeps of one model: per place, persona and contrast states [N, L, D]."""

    name: str
    persona: dict
    contrast: dict | None = None
    stats: dict = field(default_factory=dict)


def _model_stats(ms: ModelStates, place: str) -> dict:
    p = ms.persona[place]
    centroid = p.mean(axis=0)
    spread = np.sqrt(((p - centroid) ** 2).sum(axis=-1).mean(axis=0))
    out = {"centroid": centroid, "spread": spread}
    if ms.contrast is not None and ms.contrast.get(place) is not None:
        out["contrast_centroid"] = ms.contrast[place].mean(axis=0)
        out["direction"] = centroid - out["contrast_centroid"]
    return out


def compare(a: ModelStates, b: ModelStates, layers, *, permutations: int = 2000, seed: int = 0) -> dict:
    """Per place and layer: direction cosine, centroid shift over A's spread, probe fit on A tested on A and B."""
    out = {}
    for place in PLACES:
        if a.persona.get(place) is None or b.persona.get(place) is None:
            continue
        sa, sb = _model_stats(a, place), _model_stats(b, place)
        rows = []
        for k, li in enumerate(layers):
            shift = float(np.linalg.norm(sb["centroid"][k] - sa["centroid"][k]))
            row = {
                "layer": li,
                "shift_norm": shift,
                "spread_a": float(sa["spread"][k]),
                "shift": shift / float(sa["spread"][k]) if sa["spread"][k] > 0 else float("nan"),
            }
            if "direction" in sa and "direction" in sb:
                d = sa["direction"][k]
                thr = float(d @ (sa["centroid"][k] + sa["contrast_centroid"][k]) / 2)
                pb, nb = b.persona[place][:, k], b.contrast[place][:, k]
                row.update(
                    cosine=_cos(d, sb["direction"][k]),
                    probe_acc_a=probe_accuracy(d, thr, a.persona[place][:, k], a.contrast[place][:, k]),
                    probe_acc_b=probe_accuracy(d, thr, pb, nb),
                    probe_p_b=permutation_pvalue(d, thr, pb, nb, permutations=permutations, seed=seed),
                )
            rows.append(row)
        out[place] = rows
    return out


def _states(model_dir, rows, contrast, layers, batch_size, progress, adapter=None) -> tuple:
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir), adapter_path=None if adapter is None else str(adapter))
    if layers is None:
        layers = list(range(len(model.layers)))
    name = Path(model_dir).name + (f"+{Path(adapter).name}" if adapter else "")
    persona = hidden_states(model, tokenizer, rows, layers, batch_size=batch_size, progress=progress, desc=name)
    neg = None
    if contrast is not None:
        neg = hidden_states(model, tokenizer, contrast, layers, batch_size=batch_size, progress=progress, desc=name)
    del model
    return ModelStates(name, persona, neg), layers


def probe_models(
    models,
    prompts,
    *,
    contrast=None,
    layers=None,
    adapter=None,
    adapter_on: int = 0,
    batch_size: int = 8,
    permutations: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Probe model directories ``models`` (loaded one at a time) on ``prompts`` (path or rows) and optional
    ``contrast`` prompts; ``adapter``: an mlx-lm adapter directory applied to ``models[adapter_on]``.

    Returns a JSON-able dict: ``layers``, ``models`` (per model and place: ``spread`` and, with contrast,
    ``direction_norm`` per layer), ``pairs`` (every ordered pair (0, j) and consecutive (i, i+1), see
    ``compare``) and ``adapter`` (per place and layer: ``cosine_to_direction`` and ``change_norm``).
    """
    if len(models) < 2:
        raise ReqnoiseError("probe needs at least two models (--models A B ...)")
    rows = read_probe_prompts(prompts) if isinstance(prompts, (str, Path)) else prompts
    neg = read_probe_prompts(contrast) if isinstance(contrast, (str, Path)) else contrast
    if neg is not None and (len(rows) < 2 or len(neg) < 2):
        raise ReqnoiseError("the probe needs at least 2 persona and 2 contrast prompts")
    if adapter is not None and not 0 <= adapter_on < len(models):
        raise ReqnoiseError(f"adapter_on {adapter_on} is not an index of the {len(models)} models")
    states = []
    for m in models:
        if not (Path(m) / "config.json").is_file():
            raise ReqnoiseError(f"model directory {m} has no config.json")
    for m in models:
        ms, layers = _states(m, rows, neg, layers, batch_size, progress)
        states.append(ms)
    result = {"layers": list(layers), "places": [p for p in PLACES if states[0].persona.get(p) is not None]}
    result["models"] = []
    for ms in states:
        entry = {"name": ms.name}
        for place in result["places"]:
            st = _model_stats(ms, place)
            entry[place] = {"spread": st["spread"].tolist()}
            if "direction" in st:
                entry[place]["direction_norm"] = np.linalg.norm(st["direction"], axis=-1).tolist()
        result["models"].append(entry)
    pairs = sorted({(0, j) for j in range(1, len(models))} | {(i, i + 1) for i in range(len(models) - 1)})
    result["pairs"] = [
        {
            "a": states[i].name,
            "b": states[j].name,
            **compare(states[i], states[j], layers, permutations=permutations, seed=seed),
        }
        for i, j in pairs
    ]
    if adapter is not None:
        with_adapter, _ = _states(models[adapter_on], rows, None, layers, batch_size, progress, adapter=adapter)
        base = states[adapter_on]
        result["adapter"] = {"path": str(adapter), "on": base.name}
        for place in result["places"]:
            change = with_adapter.persona[place].mean(axis=0) - base.persona[place].mean(axis=0)
            st = _model_stats(base, place)
            result["adapter"][place] = [
                {
                    "layer": li,
                    "change_norm": float(np.linalg.norm(change[k])),
                    "cosine_to_direction": _cos(change[k], st["direction"][k]) if "direction" in st else None,
                }
                for k, li in enumerate(layers)
            ]
    return _finite(result)


def _finite(obj):
    """NaN -> None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def plot_probe(result: dict, path) -> None:
    """One row of panels per model pair: per-layer cosine of persona directions (when there is a contrast)
    and centroid shift over A's spread, each place a line. Written atomically (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reqnoise.atomic import atomic_file

    pairs = result["pairs"]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 3 * len(pairs)), squeeze=False)
    for (ax_cos, ax_shift), pair in zip(axes, pairs):
        for place in result["places"]:
            rows = pair.get(place, [])
            x = [r["layer"] for r in rows]
            if rows and "cosine" in rows[0]:
                ax_cos.plot(x, [r["cosine"] for r in rows], marker="o", label=place)
            ax_shift.plot(x, [r["shift"] for r in rows], marker="o", label=place)
        ax_cos.set_title(f"{pair['a']} vs {pair['b']}: cosine of persona directions", fontsize=9)
        ax_cos.set_ylim(-1.05, 1.05)
        ax_shift.set_title("persona centroid shift / spread of A", fontsize=9)
        for ax in (ax_cos, ax_shift):
            ax.set_xlabel("layer")
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, overwrite=True, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
