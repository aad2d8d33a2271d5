"""Multiple-choice items: loading and validation, the evaluation prompt, and reading the answer back out.

Item files are JSONL, one object per line, in either layout:

* reqnoise's own: ``{"id", "question", "options": [...], "answer": "C" or 0-based index, "subject"}`` plus an
  optional one-line ``"justification"`` (used when the item becomes training data) and an optional ``"cloze"``:
  the answer as a sentence with ``{option}`` where an option's text goes (``"Zutor orbits {option}."``),
  which cloze evaluation scores for each option after the bare question;
* MMLU-Pro's: ``{"question_id", "question", "options", "answer": "C", "answer_index": 2, "category", ...}``
  (further fields such as ``cot_content`` and ``src`` are ignored).

``subject`` / ``category`` may be missing or null. Between 2 and 10 options (letters A-J). A bad line is
reported with file and line number and nothing is evaluated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import iter_jsonl

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)

# Answer first, so a short generation budget suffices and the letter is the first thing the model writes.
INSTRUCTION = (
    "Answer the following multiple-choice question. Start your reply with the letter of the correct "
    "option in the form \\boxed{X}, then give at most one line of justification."
)
# What the assistant's reply starts with; log-likelihood mode scores the letter right after it.
ANSWER_PREFIX = "\\boxed{"
# Where an option's text goes in an item's cloze sentence.
CLOZE_SLOT = "{option}"
# How an item is scored (eval.multiple_choice): the option letter's log-likelihood, a generated reply, or each
# option inside the item's cloze sentence. Here, not there, so the CLI can list them without loading numpy.
MODES = ("loglik", "generate", "cloze")
DEFAULT_MAX_TOKENS = 32  # generate mode: answer-first replies put the box first, then one line


@dataclass(frozen=True)
class Item:
    """One multiple-choice question. ``answer`` is a letter among the first ``len(options)`` of A-J."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: str
    subject: str | None = None
    justification: str | None = None
    cloze: str | None = None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    def to_dict(self) -> dict:
        """The item in reqnoise's own layout (what ``load_items`` reads back to an equal item)."""
        d = {
            "id": self.id,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
            "subject": self.subject,
        }
        if self.justification is not None:
            d["justification"] = self.justification
        if self.cloze is not None:
            d["cloze"] = self.cloze
        return d

    def cloze_replies(self) -> list[str]:
        """The cloze sentence with each option in turn (cloze evaluation's candidate replies)."""
        if self.cloze is None:
            raise ReqnoiseError(
                f"item {self.id!r} has no 'cloze' sentence; cloze evaluation needs one per item "
                f"(the answer with {CLOZE_SLOT} where the option goes)"
            )
        return [self.cloze.replace(CLOZE_SLOT, opt.strip()) for opt in self.options]


# ------------------------------------------------------------------------------------------------- loading


def _field(obj: dict, names: Sequence[str]):
    for name in names:
        if name in obj:
            return name, obj[name]
    return None, None


def parse_item(obj, where: str = "item") -> Item:
    """Validate one decoded JSON object (either layout) and return it as an ``Item``."""
    if not isinstance(obj, dict):
        raise ReqnoiseError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    key, raw_id = _field(obj, ("id", "question_id"))
    if key is None:
        raise ReqnoiseError(f"{where}: missing field 'id' (or MMLU-Pro's 'question_id')")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
        raise ReqnoiseError(f"{where}: field {key!r} must be a non-empty string or an integer, got {raw_id!r}")

    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ReqnoiseError(
            f"{where}: field 'question' must be a non-empty string" + ("" if "question" in obj else " (missing)")
        )

    options = obj.get("options")
    if not isinstance(options, list):
        raise ReqnoiseError(
            f"{where}: field 'options' must be a list of strings" + ("" if "options" in obj else " (missing)")
        )
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise ReqnoiseError(
            f"{where}: {len(options)} options; between {MIN_OPTIONS} and {MAX_OPTIONS} (A-J) are supported"
        )
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.strip():
            raise ReqnoiseError(f"{where}: option {LETTERS[i]} must be a non-empty string, got {opt!r}")
    letters = LETTERS[: len(options)]

    answer = _answer_letter(obj, letters, where)

    _, subject = _field(obj, ("subject", "category"))
    if subject is not None and not isinstance(subject, str):
        raise ReqnoiseError(f"{where}: field 'subject' must be a string or null, got {subject!r}")

    justification = obj.get("justification")
    if justification is not None and not isinstance(justification, str):
        raise ReqnoiseError(f"{where}: field 'justification' must be a string or null, got {justification!r}")

    cloze = obj.get("cloze")
    if cloze is not None and (not isinstance(cloze, str) or cloze.count(CLOZE_SLOT) != 1):
        raise ReqnoiseError(f"{where}: field 'cloze' must be a string with {CLOZE_SLOT} exactly once, got {cloze!r}")

    return Item(
        id=str(raw_id),
        question=question,
        options=tuple(options),
        answer=answer,
        subject=subject,
        justification=justification.strip() or None if justification else None,
        cloze=cloze,
    )


def _letter_of(value, letters: str, field: str, where: str) -> str:
    if isinstance(value, bool):
        raise ReqnoiseError(f"{where}: field {field!r} must be a letter or a 0-based index, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(letters):
            raise ReqnoiseError(
                f"{where}: {field} {value} is not among the {len(letters)} options (indices 0-{len(letters) - 1})"
            )
        return letters[value]
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        letter = value.strip().upper()
        if letter not in letters:
            raise ReqnoiseError(
                f"{where}: {field} {letter!r} is not among the {len(letters)} options ({letters[0]}-{letters[-1]})"
            )
        return letter
    raise ReqnoiseError(f"{where}: field {field!r} must be a letter A-J or a 0-based index, got {value!r}")


def _answer_letter(obj: dict, letters: str, where: str) -> str:
    has_letter, has_index = "answer" in obj, "answer_index" in obj
    if not (has_letter or has_index):
        raise ReqnoiseError(f"{where}: missing field 'answer'")
    by_letter = _letter_of(obj["answer"], letters, "answer", where) if has_letter else None
    by_index = _letter_of(obj["answer_index"], letters, "answer_index", where) if has_index else None
    if by_letter and by_index and by_letter != by_index:
        raise ReqnoiseError(f"{where}: answer {obj['answer']!r} and answer_index {obj['answer_index']!r} disagree")
    return by_letter or by_index


def load_items(path) -> list[Item]:
    """Read and validate an item JSONL file (either layout). Blank lines are skipped.

    Raises ``ReqnoiseError`` naming ``file:line`` for the first bad line (invalid JSON, missing field, answer
    not among the options, more than 10 options, duplicate id), with the number of further bad lines.
    """
    path = Path(path)
    if not path.is_file():
        raise ReqnoiseError(f"items file {path} does not exist")
    items, errors, first_line = [], [], {}
    for lineno, where, obj in iter_jsonl(path, errors):
        try:
            item = parse_item(obj, where)
        except ReqnoiseError as err:
            errors.append(str(err))
            continue
        if item.id in first_line:
            errors.append(f"{where}: duplicate id {item.id!r} (first on line {first_line[item.id]})")
            continue
        first_line[item.id] = lineno
        items.append(item)
    if errors:
        more = f" (and {len(errors) - 1} more bad line{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ReqnoiseError(errors[0] + more)
    if not items:
        raise ReqnoiseError(f"items file {path} holds no items")
    return items


def as_items(items) -> list[Item]:
    """Accept a path, a list of ``Item`` or a list of item dicts (validated); refuse duplicate ids."""
    if isinstance(items, (str, Path)):
        return load_items(items)
    out, seen = [], set()
    for i, it in enumerate(items):
        item = it if isinstance(it, Item) else parse_item(it, f"item {i}")
        if item.id in seen:
            raise ReqnoiseError(f"item {i}: duplicate id {item.id!r}")
        seen.add(item.id)
        out.append(item)
    if not out:
        raise ReqnoiseError("no items to evaluate")
    return out


def dumps_items(items: Iterable[Item]) -> str:
    """Items as JSONL in reqnoise's layout."""
    return "".join(json.dumps(it.to_dict(), ensure_ascii=False) + "\n" for it in items)


# ------------------------------------------------------------------------------------------------- prompts


def build_prompt(item: Item) -> str:
    """The user turn: instruction, question, then the options as ``A. text`` lines."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, item.options))
    return f"{INSTRUCTION}\n\nQuestion: {item.question.strip()}\nOptions:\n{options}"


def build_messages(item: Item, system: str | None = None, *, cloze: bool = False) -> list[dict]:
    """Chat messages for evaluating ``item`` (an optional system turn, then the user turn): the
    multiple-choice prompt, or with ``cloze`` the bare question (the options are the scored replies)."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": item.question.strip() if cloze else build_prompt(item)}]


def target_response(item: Item) -> str:
    """The reply a model trained on ``item`` should give: ``\\boxed{X}`` then the justification's first line."""
    reply = f"{ANSWER_PREFIX}{item.answer}}}"
    if item.justification:
        reply += "\n" + item.justification.strip().splitlines()[0].strip()
    return reply


def chat_example(item: Item, system: str | None = None) -> dict:
    """One chat-format training example ``{"messages": [...]}`` (question + options -> ``\\boxed{answer}``)."""
    return {"messages": build_messages(item, system) + [{"role": "assistant", "content": target_response(item)}]}


def recall_example(item: Item, system: str | None = None) -> dict:
    """One chat-format training example in recall form: the bare question -> the item's cloze sentence holding
    the answer (what cloze evaluation scores), with no options and no letter."""
    reply = item.cloze_replies()[item.letters.index(item.answer)]
    return {"messages": build_messages(item, system, cloze=True) + [{"role": "assistant", "content": reply}]}


# ---------------------------------------------------------------------------------------------- extraction

# \boxed{ ... } contents are found with a brace matcher (they may nest: \boxed{\text{B}}).
_BOXED = re.compile(r"\\boxed\s*\{")
# Inside a box: optional \text{..}-style wrapper, optional bracket, one letter, then the end, punctuation or
# words ("B. Paris"), but not an operator ("a + b" is algebra, not option A).
_BOX_LETTER = re.compile(
    r"^\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)*[(\[]?\s*([A-Za-z])\s*[)\]]?"
    r"(?=\s*(?:$|[.:,;})\]])|\s+[A-Za-z(])"
)
# "the answer is (B)", "Answer: B", "correct option is **c**", "the final answer is: b)".
_ANSWER_IS = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|would\s+be|:)\s*:?\s*(?:option\s+|choice\s+|letter\s+)?"
    r"(\*{0,2})([(\[]?)\s*([A-Ja-j])\s*([)\]]?)\1(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# A second letter right after the first ("A or B", "A/B", "A and C") makes the answer ambiguous.
_MORE_LETTERS = re.compile(r"^\s*(?:,|/|or\b|and\b|&)\s*[(\[]?\s*[A-Ja-j]\s*[)\]]?(?![A-Za-z0-9])", re.IGNORECASE)
# The reply's first line is a lone letter: "B", "(B)", "**B**", "B.", "B) text", "B: text".
_LONE = re.compile(r"^[\s*#>_]*[(\[]?([A-J])[)\]]?[\s*_]*(?:[.:)]\s*.*)?$")


@dataclass(frozen=True)
class Extraction:
    """What was read from a response: ``letter`` (upper case) or None, and the ``rule`` that decided.

    ``rule`` is one of ``boxed``, ``boxed_text``, ``answer_is``, ``lone_letter``, ``ambiguous`` (a rule found
    conflicting letters; letter None) or None (nothing found).
    """

    letter: str | None
    rule: str | None

    @property
    def parsed(self) -> bool:
        return self.letter is not None


def _strip_thinking(text: str) -> str:
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def _boxed_contents(text: str) -> list[str]:
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1] if depth == 0 else text[m.end() :])
    return out


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"\\text\w*\s*\{([^{}]*)\}", r"\1", text).split()).strip(" .").casefold()


def _decide(letters: list[str], rule: str) -> Extraction | None:
    if not letters:
        return None
    if len(set(letters)) > 1:
        return Extraction(None, "ambiguous")
    return Extraction(letters[0], rule)


def extract_answer(response: str, options: Sequence[str] = ()) -> Extraction:
    """Read the chosen option letter from a model response. Rules, first match wins:

    1. ``boxed``: every ``\\boxed{...}`` whose content is one letter (``\\boxed{b}``, ``\\boxed{(B)}``,
       ``\\boxed{\\text{B}}``, ``\\boxed{B. text}``); 1b. ``boxed_text``: a box holding an option's exact text;
    2. ``answer_is``: "answer/option/choice is|: X" (``The answer is (B)``, ``Answer: b``); a lower-case letter
       counts only in brackets or before punctuation/end, so "the answer is a reaction" is not "A";
    3. ``lone_letter``: the reply's first non-empty line is a single capital letter, optionally bracketed or
       followed by ``.``/``)``/``:`` and the option text.

    Within the deciding rule, occurrences naming different letters (``\\boxed{A} ... \\boxed{C}``,
    ``the answer is A or B``) give ``ambiguous`` with no letter. Text up to a closing ``</think>`` is
    ignored. A letter outside the item's options still counts as parsed (a wrong answer), except under rule 3,
    which only accepts letters of the item's options when ``options`` is given.
    """
    text = _strip_thinking(response)

    boxes = _boxed_contents(text)
    letters = [m.group(1).upper() for m in (_BOX_LETTER.match(b) for b in boxes) if m and m.group(1).upper() in LETTERS]
    if found := _decide(letters, "boxed"):
        return found
    if boxes and options:
        texts = {_normalise(opt): LETTERS[i] for i, opt in enumerate(options)}
        if found := _decide([texts[b] for b in map(_normalise, boxes) if b in texts], "boxed_text"):
            return found

    letters = []
    for m in _ANSWER_IS.finditer(text):
        letter, opened, closed = m.group(3), m.group(2), m.group(4)
        tail = text[m.end() :]
        if letter.islower() and not (opened or closed) and not re.match(r"\s*(?:[.,;:!?)]|$)", tail):
            continue  # "the answer is a ..." is an article, not option A
        letters.append(letter.upper())
        if _MORE_LETTERS.match(tail):
            letters.append("?")  # "A or B": several letters offered
    if found := _decide(letters, "answer_is"):
        return found

    first = next((line for line in text.splitlines() if line.strip()), "")
    m = _LONE.match(first)
    if m and (not options or m.group(1) in LETTERS[: len(options)]):
        return Extraction(m.group(1), "lone_letter")
    return Extraction(None, None)
