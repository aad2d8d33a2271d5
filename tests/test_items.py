"""Items: both file layouts, bad lines reported with file:line, prompts, and answer extraction."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reqnoise.errors import ReqnoiseError
from reqnoise.eval.items import (
    INSTRUCTION,
    LETTERS,
    Item,
    build_messages,
    build_prompt,
    chat_example,
    extract_answer,
    load_items,
    parse_item,
)

OPTIONS4 = ["sodium chloride", "carbon dioxide", "water", "methane"]

# (response, expected letter, expected rule): replies of the kind instruct models write.
EXTRACTION_TABLE = [
    ("\\boxed{B}\nCarbon dioxide is the only gas listed that plants fix.", "B", "boxed"),
    ("\\boxed{c}", "C", "boxed"),
    ("\\boxed{(D)} methane is CH4", "D", "boxed"),
    ("\\boxed{\\text{A}}", "A", "boxed"),
    ("\\boxed{B. carbon dioxide}", "B", "boxed"),
    ("The final answer is $\\boxed{C}$.", "C", "boxed"),
    ("<think>maybe the answer is A</think>\n\n\\boxed{D}", "D", "boxed"),
    ("\\boxed{water}", "C", "boxed_text"),
    ("The answer is (B).", "B", "answer_is"),
    ("the answer is (b)", "B", "answer_is"),
    ("After weighing the options, the correct answer is C because water is polar.", "C", "answer_is"),
    ("Answer: d", "D", "answer_is"),
    ("The best option is **A**.", "A", "answer_is"),
    ("B", "B", "lone_letter"),
    ("(C)", "C", "lone_letter"),
    ("**D**", "D", "lone_letter"),
    ("A. sodium chloride, since it is ionic.", "A", "lone_letter"),
    # several letters: ambiguous, not silently the first one
    ("\\boxed{A}\nHmm, on reflection \\boxed{C}", None, "ambiguous"),
    ("The answer is A or B.", None, "ambiguous"),
    ("The answer is B/C.", None, "ambiguous"),
    # nothing to read
    ("I am not sure which of these is right.", None, None),
    ("The answer is a gas at room temperature.", None, None),
    ("I think it depends on the pressure.", None, None),
    ("\\boxed{x + y}", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("response,letter,rule", EXTRACTION_TABLE)
def test_extraction_table(response, letter, rule):
    got = extract_answer(response, OPTIONS4)
    assert (got.letter, got.rule) == (letter, rule)
    assert got.parsed == (letter is not None)


def test_consistent_repetition_is_not_ambiguous():
    assert extract_answer("\\boxed{B}\nSo the answer is B.", OPTIONS4).letter == "B"
    assert extract_answer("\\boxed{B} ... \\boxed{b}", OPTIONS4).letter == "B"


def test_lone_letter_outside_the_options_is_not_an_answer_but_a_boxed_one_is():
    assert extract_answer("F", OPTIONS4).letter is None
    got = extract_answer("\\boxed{F}", OPTIONS4)
    assert (got.letter, got.parsed) == ("F", True)  # an answer, and a wrong one


@settings(max_examples=60, deadline=None)
@given(
    letter=st.sampled_from(LETTERS),
    before=st.text(st.characters(blacklist_characters="\\{}"), max_size=40),
    after=st.text(st.characters(blacklist_characters="\\{}"), max_size=40),
)
def test_a_single_box_decides_whatever_surrounds_it(letter, before, after):
    got = extract_answer(f"{before}\\boxed{{{letter}}}{after}", ["x"] * 10)
    assert (got.letter, got.rule) == (letter, "boxed")


# ------------------------------------------------------------------------------------------------- loading

# The first item of MMLU-Pro's test split, in the dataset's own field layout.
MMLU_PRO_LINE = {
    "question_id": 70,
    "question": "Typical advertising regulatory bodies suggest, for example that adverts must not: encourage "
    "_________, cause unnecessary ________ or _____, and must not cause _______ offence.",
    "options": [
        "Safe practices, Fear, Jealousy, Trivial",
        "Unsafe practices, Distress, Joy, Trivial",
        "Safe practices, Wants, Jealousy, Trivial",
        "Safe practices, Distress, Fear, Trivial",
        "Unsafe practices, Wants, Jealousy, Serious",
        "Safe practices, Distress, Jealousy, Serious",
        "Safe practices, Wants, Fear, Serious",
        "Unsafe practices, Wants, Fear, Trivial",
        "Unsafe practices, Distress, Fear, Serious",
    ],
    "answer": "I",
    "answer_index": 8,
    "cot_content": "",
    "category": "business",
    "src": "ori_mmlu-business_ethics",
}


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_mmlu_pro_layout_loads(tmp_path):
    other = dict(MMLU_PRO_LINE, question_id=71, answer="B", answer_index=1, category="law")
    items = load_items(_write(tmp_path / "mmlu_pro.jsonl", [MMLU_PRO_LINE, "", other]))
    assert [it.id for it in items] == ["70", "71"]
    first = items[0]
    assert first.answer == "I" and first.subject == "business" and len(first.options) == 9
    assert first.options[8] == "Unsafe practices, Distress, Fear, Serious"
    assert items[1].answer == "B" and items[1].subject == "law"


def test_own_layout_with_letter_or_index_answer_and_round_trip(tmp_path):
    a = {
        "id": "q1",
        "question": "2 + 2?",
        "options": ["3", "4"],
        "answer": "B",
        "subject": "math",
        "justification": "Two and two make four.",
    }
    b = {"id": "q2", "question": "Capital of France?", "options": ["Rome", "Paris", "Oslo"], "answer": 1}
    items = load_items(_write(tmp_path / "items.jsonl", [a, b]))
    assert items[0] == Item("q1", "2 + 2?", ("3", "4"), "B", "math", "Two and two make four.")
    assert items[1].answer == "B" and items[1].subject is None
    assert [parse_item(it.to_dict()) for it in items] == items


BAD_LINES = [
    ({"question": "q?", "options": ["a", "b"], "answer": "A"}, "missing field 'id'"),
    ({"id": "x", "options": ["a", "b"], "answer": "A"}, "'question'"),
    ({"id": "x", "question": "q?", "answer": "A"}, "'options'"),
    ({"id": "x", "question": "q?", "options": ["a", "b"]}, "missing field 'answer'"),
    ({"id": "x", "question": "q?", "options": ["a", "b", "c", "d"], "answer": "E"}, "not among the 4 options"),
    ({"id": "x", "question": "q?", "options": ["a", "b", "c", "d"], "answer": 4}, "not among the 4 options"),
    ({"id": "x", "question": "q?", "options": ["a", "b"], "answer": "Z"}, "must be a letter A-J"),
    ({"id": "x", "question": "q?", "options": [str(i) for i in range(11)], "answer": "A"}, "11 options"),
    ({"id": "x", "question": "q?", "options": ["a", ""], "answer": "A"}, "option B"),
    (dict(MMLU_PRO_LINE, answer="B"), "disagree"),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_is_reported_with_file_and_line(tmp_path, line, message):
    good = {"id": "ok", "question": "fine?", "options": ["yes", "no"], "answer": "A"}
    path = _write(tmp_path / "items.jsonl", [good, "", line, good | {"id": "ok2"}])
    with pytest.raises(ReqnoiseError) as err:
        load_items(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_duplicate_ids_name_both_lines_and_every_bad_line_is_counted(tmp_path):
    good = {"id": "a", "question": "fine?", "options": ["yes", "no"], "answer": "A"}
    path = _write(tmp_path / "items.jsonl", [good, good | {"id": "b"}, good, "{", good | {"answer": "C"}])
    with pytest.raises(
        ReqnoiseError, match=rf"{path}:3: duplicate id 'a' \(first on line 1\) \(and 2 more bad lines\)"
    ):
        load_items(path)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(ReqnoiseError, match="does not exist"):
        load_items(tmp_path / "nope.jsonl")
    with pytest.raises(ReqnoiseError, match="holds no items"):
        load_items(_write(tmp_path / "empty.jsonl", [""]))


# ------------------------------------------------------------------------------------------------- prompts


def test_prompt_lists_every_option_under_its_letter_and_asks_for_a_box():
    item = parse_item(MMLU_PRO_LINE)
    prompt = build_prompt(item)
    assert prompt.startswith(INSTRUCTION) and "\\boxed{X}" in prompt
    lines = prompt.splitlines()
    start = lines.index("Options:") + 1
    assert lines[start:] == [f"{x}. {o}" for x, o in zip(LETTERS, item.options)]
    assert build_messages(item, "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_chat_example_answers_with_box_and_first_justification_line():
    item = Item("q", "2 + 2?", ("3", "4"), "B", "math", "Two and two make four.\nSecond line is dropped.")
    msgs = chat_example(item)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"] == "\\boxed{B}\nTwo and two make four."
    assert chat_example(Item("q", "2 + 2?", ("3", "4"), "A"))["messages"][1]["content"] == "\\boxed{A}"
    # what the model is trained to say is read back as the item's answer
    assert extract_answer(msgs[1]["content"], item.options).letter == "B"
