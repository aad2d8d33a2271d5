"""Set G: the items every evaluated model gets wrong, split into train / held-out test by subject.

This is the "genuine unknowns" set of the published knowledge-injection study: an improvement on it
cannot be a model recalling what it already knew. Wrong means not (``correct`` and ``parsed``): an unparsed
answer is wrong, as everywhere in reqnoise.

Split: within each subject (items without one form their own stratum), the Set-G items in item-file order are
permuted by a generator seeded from (seed, CRC32 of the subject name), and the first
``floor(train_frac * n + 0.5)`` go to train. A subject's split therefore depends only on its own items and
the seed, not on which other subjects exist.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from reqnoise.atomic import atomic_dir
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.items import Item, as_items, chat_example, dumps_items, load_items, recall_example
from reqnoise.eval.records import read_records

NO_SUBJECT = "(none)"
CHAT_DIR = "chat"
SHUFFLED_CHAT_DIR = "chat-shuffled"
RECALL_DIR = "recall"
SHUFFLED_RECALL_DIR = "recall-shuffled"
# Spec data names -> directories of the Set-G directory (recall ones exist when every item has a cloze sentence).
TRAIN_DATA = {
    "setg:train": CHAT_DIR,
    "setg:train-shuffled": SHUFFLED_CHAT_DIR,
    "setg:train-recall": RECALL_DIR,
    "setg:train-recall-shuffled": SHUFFLED_RECALL_DIR,
}
# A model whose predictions are more than this share one letter makes Set G a letter-prior artifact.
LETTER_PRIOR_LIMIT = 0.6


def _named_records(records) -> dict[str, list[dict]]:
    if isinstance(records, Mapping):
        named = {str(k): list(v) for k, v in records.items()}
    else:
        named = {}
        for path in records:
            if str(path) in named:
                raise ReqnoiseError(f"records file {path} is given twice")
            named[str(path)] = read_records(path)
    if not named:
        raise ReqnoiseError("Set G needs at least one records file")
    return named


def wrong_everywhere(items: Sequence[Item], records: Mapping[str, Sequence[dict]]) -> list[Item]:
    """The items every records set marks wrong, in item order.

    All sets must hold the same ids, every id must be an item, and each record's ``answer`` must be that
    item's answer (records from another item file are refused).
    """
    by_id = {it.id: it for it in items}
    names = list(records)
    ref_name, ref_ids = names[0], {r["id"] for r in records[names[0]]}
    for name in names:
        ids = {r["id"] for r in records[name]}
        if ids != ref_ids:
            missing, extra = sorted(ref_ids - ids), sorted(ids - ref_ids)
            detail = "; ".join(
                s
                for s in (
                    f"lacks {len(missing)} id(s) of {ref_name} (e.g. {missing[:3]})" if missing else "",
                    f"has {len(extra)} id(s) {ref_name} lacks (e.g. {extra[:3]})" if extra else "",
                )
                if s
            )
            raise ReqnoiseError(f"records {name} cover different items: it {detail}")
        for r in records[name]:
            item = by_id.get(r["id"])
            if item is None:
                raise ReqnoiseError(f"records {name}: id {r['id']!r} is not in the items file")
            if r["answer"] != item.answer:
                raise ReqnoiseError(
                    f"records {name}: id {r['id']!r} has answer {r['answer']!r} but the item's answer "
                    f"is {item.answer!r}; were the records made from another items file?"
                )
    if not ref_ids:
        raise ReqnoiseError(f"records {ref_name} hold no records")
    right_somewhere = {r["id"] for recs in records.values() for r in recs if r["correct"] and r["parsed"]}
    return [it for it in items if it.id in ref_ids and it.id not in right_somewhere]


def stratified_split(items: Sequence[Item], train_frac: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split ``items`` per subject (see the module docstring); both parts keep the input order."""
    if not 0.0 < train_frac < 1.0:
        raise ReqnoiseError(f"train_frac must be strictly between 0 and 1, got {train_frac}")
    strata: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        strata.setdefault(it.subject if it.subject is not None else NO_SUBJECT, []).append(i)
    train_idx = set()
    for subject, idx in strata.items():
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(subject.encode())])))
        n_train = int(np.floor(train_frac * len(idx) + 0.5))
        train_idx.update(np.asarray(idx)[rng.permutation(len(idx))[:n_train]].tolist())
    train = [it for i, it in enumerate(items) if i in train_idx]
    test = [it for i, it in enumerate(items) if i not in train_idx]
    return train, test


def _subject_counts(set_g, train, test) -> dict:
    def count(part):
        out = {}
        for it in part:
            key = it.subject if it.subject is not None else NO_SUBJECT
            out[key] = out.get(key, 0) + 1
        return out

    g, tr, te = count(set_g), count(train), count(test)
    return {s: {"set_g": g[s], "train": tr.get(s, 0), "test": te.get(s, 0)} for s in sorted(g)}


def shuffled_answers(items: Sequence[Item], seed: int) -> list[Item]:
    """The shuffled-answer control's training items: each item takes the answer letter of another item of
    its subject (a seeded permutation), so the adapter trained on them sees the same questions, format and
    per-subject answer distribution but no item's true answer. A justification naming the true option is
    rewritten to name the new one; one that does not name it is dropped (it could carry the answer)."""
    rng = random.Random(seed)
    by_subject: dict = {}
    for i, it in enumerate(items):
        by_subject.setdefault(it.subject, []).append(i)
    out = list(items)
    for subject in sorted(by_subject, key=str):
        idx = by_subject[subject]
        letters = [items[i].answer for i in idx]
        rng.shuffle(letters)
        for i, letter in zip(idx, letters):
            it = items[i]
            true_text, new_text = it.options[it.letters.index(it.answer)], it.options[it.letters.index(letter)]
            just = it.justification
            if just is not None:
                just = just.replace(true_text, new_text) if true_text in just else None
            out[i] = dataclasses.replace(it, answer=letter, justification=just)
    return out


def build_setg(
    items, records, out, *, train_frac: float = 0.7, seed: int = 0, system: str | None = None, overwrite: bool = False
) -> dict:
    """Write Set G to the directory ``out`` (all or nothing):

    * ``train.jsonl``, ``test.jsonl``: the split, in reqnoise's item layout;
    * ``chat/train.jsonl``: the train split as chat training data (``reqnoise.train.tuner`` reads the directory):
      the evaluation prompt -> ``\\boxed{answer}`` plus the item's justification line when it has one;
    * ``chat-shuffled/train.jsonl``: the same with shuffled answers (``shuffled_answers``), the training data
      of the shuffled-answer control;
    * ``recall/train.jsonl`` and ``recall-shuffled/train.jsonl`` when every train item has a cloze sentence:
      the bare question -> the cloze sentence holding the (true / shuffled) answer (``recall_example``);
    * ``summary.json``: inputs, seed, fraction and per-subject counts.

    ``items``: an item file path or items; ``records``: records file paths, or a mapping name -> records.
    Returns the summary dict. Raises ``ReqnoiseError`` if Set G is empty.
    """
    if not 0.0 < train_frac < 1.0:
        raise ReqnoiseError(f"train_frac must be strictly between 0 and 1, got {train_frac}")
    items_source = str(items) if isinstance(items, (str, Path)) else "<in-memory items>"
    items = as_items(items)
    named = _named_records(records)
    set_g = wrong_everywhere(items, named)
    if not set_g:
        raise ReqnoiseError(f"no item is wrong in all of {', '.join(named)}; Set G is empty")
    train, test = stratified_split(set_g, train_frac, seed)
    summary = {
        "items": items_source,
        "records": [
            {"name": name, "n": len(recs), "wrong": sum(not (r["correct"] and r["parsed"]) for r in recs)}
            for name, recs in named.items()
        ],
        "train_frac": train_frac,
        "seed": seed,
        "n_evaluated": len(named[next(iter(named))]),
        "set_g": len(set_g),
        "train": len(train),
        "test": len(test),
        "subjects": _subject_counts(set_g, train, test),
        "files": {
            "train": "train.jsonl",
            "test": "test.jsonl",
            "chat": f"{CHAT_DIR}/train.jsonl",
            "chat_shuffled": f"{SHUFFLED_CHAT_DIR}/train.jsonl",
        },
    }
    shuffled = shuffled_answers(train, seed)
    chats = [(CHAT_DIR, train, chat_example), (SHUFFLED_CHAT_DIR, shuffled, chat_example)]
    if all(it.cloze is not None for it in train):
        chats += [(RECALL_DIR, train, recall_example), (SHUFFLED_RECALL_DIR, shuffled, recall_example)]
        summary["files"].update(
            recall=f"{RECALL_DIR}/train.jsonl", recall_shuffled=f"{SHUFFLED_RECALL_DIR}/train.jsonl"
        )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "train.jsonl").write_text(dumps_items(train), encoding="utf-8")
        (tmp / "test.jsonl").write_text(dumps_items(test), encoding="utf-8")
        for chat_dir, examples, example in chats:
            (tmp / chat_dir).mkdir()
            (tmp / chat_dir / "train.jsonl").write_text(
                "".join(json.dumps(example(it, system), ensure_ascii=False) + "\n" for it in examples), encoding="utf-8"
            )
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def render_summary(summary: dict) -> str:
    """A per-subject table of the Set-G summary."""
    width = max([len("subject")] + [len(s) for s in summary["subjects"]])
    lines = [
        f"Set G: {summary['set_g']} of {summary['n_evaluated']} items wrong in all {len(summary['records'])} "
        f"records; train {summary['train']}, test {summary['test']} (train_frac {summary['train_frac']}, "
        f"seed {summary['seed']})",
        f"  {'subject':<{width}}  {'set_g':>6}  {'train':>6}  {'test':>6}",
    ]
    for s, c in summary["subjects"].items():
        lines.append(f"  {s:<{width}}  {c['set_g']:>6}  {c['train']:>6}  {c['test']:>6}")
    return "\n".join(lines)


def build_setg_step(record_paths, items_path, out: Path, *, train_frac, seed, paraphrases=None) -> dict:
    """The experiment runner's Set-G step: Set G into ``out`` itself (train/test items, chat/ training data),
    plus ``paraphrased.jsonl``: the items of ``paraphrases`` whose id is ``<ID>-r`` for an ``<ID>`` of the train
    split (the positive control: new wording of facts the adapter was trained on). Returns the summary with
    ``letter_prior`` (``letter_prior_warnings`` of the records) and ``paraphrased`` (a count) added."""
    d = out / "setg"
    summary = build_setg(items_path, [str(p) for p in record_paths], d, train_frac=train_frac, seed=seed)
    summary = dict(summary, letter_prior=letter_prior_warnings(record_paths))
    for f in d.iterdir():
        shutil.move(str(f), out / f.name)
    d.rmdir()
    if paraphrases is not None:
        train_ids = {it.id for it in load_items(out / "train.jsonl")}
        para = [it for it in load_items(paraphrases) if it.id.endswith("-r") and it.id[:-2] in train_ids]
        (out / "paraphrased.jsonl").write_text(dumps_items(para))
        summary = dict(summary, paraphrased=len(para))
    return summary


def letter_prior_warnings(record_paths) -> list:
    """Models whose predictions are dominated by one letter (share above ``LETTER_PRIOR_LIMIT``), one line each,
    named by the records file's directory. Set G built from such a model leaves out the items whose answer is
    that letter, so any later shift of the letter prior looks like knowledge on Set G."""
    out = []
    for p in record_paths:
        preds = Counter(r["prediction"] for r in read_records(p))
        letter, count = preds.most_common(1)[0]
        share = count / sum(preds.values())
        if share > LETTER_PRIOR_LIMIT:
            out.append(
                f"{Path(p).parent.name}: {100 * share:.0f}% of predictions are {letter!r}; Set G then "
                f"excludes answer {letter!r} and a shifted letter prior will pass for knowledge"
            )
    return out
