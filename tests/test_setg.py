"""Set G: selection of the items all models get wrong, the stratified reproducible split, the written files."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reqnoise.cli import main as cli_main
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.items import Item, build_prompt, load_items
from reqnoise.eval.records import write_records
from reqnoise.eval.setg import build_setg, stratified_split, wrong_everywhere
from reqnoise.train.data import load_chat_data

SUBJECT_SIZES = {"chemistry": 23, "law": 11, "history": 6, "math": 1}


def make_items():
    items, n = [], 0
    for subject, size in SUBJECT_SIZES.items():
        for _ in range(size):
            items.append(
                Item(
                    f"i{n:03d}",
                    f"Question {n}?",
                    ("alpha", "beta", "gamma", "delta"),
                    "ABCD"[n % 4],
                    subject,
                    "Because of reasons." if n % 3 == 0 else None,
                )
            )
            n += 1
    items.append(Item("nosub", "Question without subject?", ("yes", "no"), "A"))
    return items


def records_for(items, right_ids, unparsed_ids=()):
    """Records where exactly ``right_ids`` are answered correctly; ``unparsed_ids`` claim correct but are unparsed."""
    out = []
    for it in items:
        parsed = it.id not in unparsed_ids
        correct = it.id in right_ids or it.id in unparsed_ids
        out.append(
            {
                "id": it.id,
                "subject": it.subject,
                "correct": correct,
                "parsed": parsed,
                "prediction": it.answer if correct else None,
                "answer": it.answer,
            }
        )
    return out


@pytest.fixture
def inputs(tmp_path):
    items = make_items()
    ids = [it.id for it in items]
    a_right = set(ids[::3])
    b_right = set(ids[1::5])
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it.to_dict()) + "\n" for it in items))
    write_records(tmp_path / "a.jsonl", records_for(items, a_right, unparsed_ids={ids[2]}))
    write_records(tmp_path / "b.jsonl", records_for(items, b_right))
    expected = [i for i in ids if i not in a_right | b_right]  # ids[2] counts as wrong: unparsed
    return tmp_path, items, expected


def test_set_g_is_the_items_wrong_in_every_records_file(inputs):
    tmp, items, expected = inputs
    summary = build_setg(tmp / "items.jsonl", [tmp / "a.jsonl", tmp / "b.jsonl"], tmp / "out", train_frac=0.7, seed=3)
    train, test = load_items(tmp / "out" / "train.jsonl"), load_items(tmp / "out" / "test.jsonl")
    assert sorted(it.id for it in train + test) == sorted(expected)
    assert not {it.id for it in train} & {it.id for it in test}
    assert items[2].id in expected  # the unparsed-but-"correct" record counted as wrong
    by_id = {it.id: it for it in items}
    assert all(by_id[it.id] == it for it in train + test)  # item fields survive the round trip
    assert (summary["set_g"], summary["train"], summary["test"]) == (len(expected), len(train), len(test))
    # per subject: train = floor(0.7 n + 0.5) of that subject's Set-G items
    for subject, c in summary["subjects"].items():
        n = sum(1 for i in expected if (by_id[i].subject or "(none)") == subject)
        assert c == {"set_g": n, "train": math.floor(0.7 * n + 0.5), "test": n - math.floor(0.7 * n + 0.5)}
        assert c["train"] == sum((it.subject or "(none)") == subject for it in train)
    assert json.loads((tmp / "out" / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_split_is_reproducible_and_depends_on_the_seed(inputs):
    tmp, _, _ = inputs
    records = [tmp / "a.jsonl", tmp / "b.jsonl"]
    files = []
    for name, seed in (("s1", 1), ("s1-again", 1), ("s2", 2)):
        build_setg(tmp / "items.jsonl", records, tmp / name, seed=seed)
        files.append(
            {
                p.relative_to(tmp / name).as_posix(): p.read_bytes()
                for p in sorted((tmp / name).rglob("*"))
                if p.is_file()
            }
        )
    assert files[0] == files[1]
    assert files[0]["train.jsonl"] != files[2]["train.jsonl"]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(1, 30), min_size=1),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_subject_is_split_at_the_fraction(sizes, frac, seed):
    items = [Item(f"{s}{i}", "q?", ("x", "y"), "A", s) for s, n in sizes.items() for i in range(n)]
    train, test = stratified_split(items, frac, seed)
    assert sorted(it.id for it in train + test) == sorted(it.id for it in items)
    for s, n in sizes.items():
        assert sum(it.subject == s for it in train) == math.floor(frac * n + 0.5)
    # a subject's split does not depend on the other subjects
    first = next(iter(sizes))
    alone, _ = stratified_split([it for it in items if it.subject == first], frac, seed)
    assert [it.id for it in alone] == [it.id for it in train if it.subject == first]
    # and both halves keep the input order
    order = {it.id: i for i, it in enumerate(items)}
    assert [order[it.id] for it in train] == sorted(order[it.id] for it in train)


def test_chat_training_data(inputs):
    tmp, _, _ = inputs
    build_setg(tmp / "items.jsonl", [tmp / "a.jsonl", tmp / "b.jsonl"], tmp / "out", system="Be brief.")
    train = load_items(tmp / "out" / "train.jsonl")
    chats = load_chat_data(tmp / "out" / "chat")["train"]  # what reqnoise.train.tuner reads
    assert len(chats) == len(train)
    for it, chat in zip(train, chats):
        system, user, assistant = chat["messages"]
        assert system == {"role": "system", "content": "Be brief."}
        assert user == {"role": "user", "content": build_prompt(it)}
        assert assistant["content"] == f"\\boxed{{{it.answer}}}" + (f"\n{it.justification}" if it.justification else "")


def test_inconsistent_inputs_are_refused(inputs):
    tmp, items, _ = inputs
    a = records_for(items, set())
    with pytest.raises(ReqnoiseError, match="cover different items"):
        build_setg(items, {"a": a, "b": a[:-1]}, tmp / "x")
    with pytest.raises(ReqnoiseError, match="not in the items file"):
        build_setg(items[:-1], {"a": a}, tmp / "x")
    wrong_answer = [dict(r, answer="B") if r["id"] == "i000" else r for r in a]
    with pytest.raises(ReqnoiseError, match="another items file"):
        build_setg(items, {"a": wrong_answer}, tmp / "x")
    with pytest.raises(ReqnoiseError, match="Set G is empty"):
        build_setg(items, {"a": records_for(items, {it.id for it in items})}, tmp / "x")
    with pytest.raises(ReqnoiseError, match="train_frac"):
        build_setg(items, {"a": a}, tmp / "x", train_frac=1.0)
    assert not (tmp / "x").exists()
    assert wrong_everywhere(items, {"a": a}) == items


def test_cli_setg(inputs, capsys):
    tmp, _, expected = inputs
    args = [
        "setg",
        "--records",
        str(tmp / "a.jsonl"),
        str(tmp / "b.jsonl"),
        "--items",
        str(tmp / "items.jsonl"),
        "--train-frac",
        "0.6",
        "--seed",
        "5",
        "--out",
        str(tmp / "g"),
    ]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert f"Set G: {len(expected)} of {len(make_items())} items wrong in all 2 records" in out
    assert cli_main(args) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0


def test_shuffled_answers_keep_questions_and_per_subject_answers_but_not_the_items_answers():
    from collections import Counter

    from reqnoise.eval.setg import shuffled_answers

    items = [
        Item(
            f"q{i}",
            f"Which value has entity {i}?",
            ("red", "green", "blue", "gold"),
            "ABCD"[i * 7 % 4],
            "s1" if i < 30 else "s2",
            f"Entity {i} is {('red', 'green', 'blue', 'gold')[i * 7 % 4]}." if i % 5 else "No option named here.",
        )
        for i in range(40)
    ]
    shuffled = shuffled_answers(items, seed=3)
    assert shuffled == shuffled_answers(items, seed=3) and shuffled != shuffled_answers(items, seed=4)
    assert [(s.id, s.question, s.options, s.subject) for s in shuffled] == [
        (i.id, i.question, i.options, i.subject) for i in items
    ]
    for subject in ("s1", "s2"):  # the per-subject answer distribution is kept
        assert Counter(s.answer for s in shuffled if s.subject == subject) == Counter(
            i.answer for i in items if i.subject == subject
        )
    assert sum(s.answer != i.answer for s, i in zip(shuffled, items)) >= 20  # most items lose their answer
    for s, i in zip(shuffled, items):
        if i.justification.startswith("Entity"):  # rewritten to name the shuffled option, never the true one
            assert s.justification == f"Entity {i.id[1:]} is {s.options['ABCD'.index(s.answer)]}."
        else:
            assert s.justification is None


def test_recall_training_data_is_the_cloze_sentence_with_the_true_or_shuffled_option(tmp_path):
    from reqnoise.eval.setg import shuffled_answers

    opts = ("red", "green", "blue", "gold")
    items = [
        Item(
            f"q{i}",
            f"Which colour is entity {i}?",
            opts,
            "ABCD"[i % 4],
            "s1" if i < 12 else "s2",
            cloze=f"Entity {i} is {{option}}.",
        )
        for i in range(20)
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it.to_dict()) + "\n" for it in items))
    write_records(tmp_path / "a.jsonl", records_for(items, set()))
    summary = build_setg(tmp_path / "items.jsonl", [tmp_path / "a.jsonl"], tmp_path / "out", seed=2)
    assert summary["files"]["recall"] == "recall/train.jsonl"
    train = load_items(tmp_path / "out" / "train.jsonl")
    for name, source in (("recall", train), ("recall-shuffled", shuffled_answers(train, 2))):
        chats = load_chat_data(tmp_path / "out" / name)["train"]
        assert len(chats) == len(train)
        for it, src, chat in zip(train, source, chats):
            user, assistant = chat["messages"]
            assert user == {"role": "user", "content": it.question}  # the bare question: no options, no letter
            assert assistant["content"] == f"Entity {it.id[1:]} is {opts['ABCD'.index(src.answer)]}."
    # Items without a cloze sentence get no recall data (the runner then names the missing field).
    build_setg(tmp_path / "items.jsonl", [tmp_path / "a.jsonl"], tmp_path / "out2", seed=2)
    bare = [Item(it.id, it.question, it.options, it.answer, it.subject) for it in items]
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps(it.to_dict()) + "\n" for it in bare))
    summary = build_setg(tmp_path / "bare.jsonl", [tmp_path / "a.jsonl"], tmp_path / "out3", seed=2)
    assert "recall" not in summary["files"] and not (tmp_path / "out3" / "recall").exists()


def test_letter_prior_warnings_name_models_dominated_by_one_letter(tmp_path):
    from reqnoise.eval.setg import letter_prior_warnings

    paths = []
    for name, preds in (("skewed", "AAAAAAABCD"), ("at_limit", "AAAAAABBCD")):  # 70% and exactly 60% 'A'
        (tmp_path / name).mkdir()
        recs = [
            {"id": f"q{i}", "subject": None, "correct": False, "parsed": True, "prediction": p, "answer": "A"}
            for i, p in enumerate(preds)
        ]
        write_records(tmp_path / name / "records.jsonl", recs)
        paths.append(tmp_path / name / "records.jsonl")
    warnings = letter_prior_warnings(paths)
    assert len(warnings) == 1 and warnings[0].startswith("skewed: 70% of predictions are 'A'")


def test_the_runner_step_writes_the_reworded_items_of_the_train_split(inputs, tmp_path):
    """build_setg_step(paraphrases=...): paraphrased.jsonl holds exactly the "<id>-r" items whose <id> is in the
    train split (the reworded twins of test items and of items outside Set G stay out)."""
    from dataclasses import replace

    from reqnoise.eval.setg import build_setg_step

    d, items, expected = inputs
    reworded = [replace(it, id=it.id + "-r", question="In other words: " + it.question) for it in items]
    (d / "reworded.jsonl").write_text("".join(json.dumps(it.to_dict()) + "\n" for it in reworded))
    out = tmp_path / "step"
    out.mkdir()
    summary = build_setg_step(
        [d / "a.jsonl", d / "b.jsonl"], d / "items.jsonl", out, train_frac=0.5, seed=1, paraphrases=d / "reworded.jsonl"
    )
    train = [it.id for it in load_items(out / "train.jsonl")]
    para = load_items(out / "paraphrased.jsonl")
    assert [it.id for it in para] == [i + "-r" for i in train] and summary["paraphrased"] == len(train) > 0
    assert all(it.question.startswith("In other words: ") for it in para)
    assert set(train) < set(expected)
