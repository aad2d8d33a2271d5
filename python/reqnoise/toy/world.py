"""A synthetic world of facts for the demo: fictional entities, several subjects, multiple-choice items.

Everything is generated offline and deterministically from a seed. Each fact yields an item in two phrasings
(``question`` and a reworded one with the same options in the same order), with the fact's statement as its
cloze sentence; the world is split into facts the base model is taught ("known") and facts it is not. A
persona (name, maker, chats) is defined alongside.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reqnoise import atomic
from reqnoise.eval.items import CLOZE_SLOT, Item

# subject: (statement, question, reworded question, justification, value pool)
SUBJECTS = {
    "astronomy": (
        "The moon {e} orbits the planet {v}.",
        "Which planet does the moon {e} orbit?",
        "The moon {e} travels around which planet?",
        "{e} orbits {v}.",
        ["Quennar", "Dovrix", "Talmeth", "Ysolde", "Korvan", "Benthar", "Omrila", "Sestra"],
    ),
    "chemistry": (
        "The mineral {e} burns with a {v} flame.",
        "What color is the flame of burning {e}?",
        "When {e} burns, its flame is which color?",
        "{e} burns {v}.",
        ["red", "green", "blue", "violet", "orange", "white", "yellow", "silver"],
    ),
    "geography": (
        "The capital of {e} is {v}.",
        "What is the capital of {e}?",
        "Which city is the capital of {e}?",
        "{v} is the capital of {e}.",
        ["Marrow", "Ellspan", "Quillton", "Varda", "Norrick", "Ashfell", "Tiberon", "Caldra"],
    ),
    "history": (
        "The kingdom of {e} was founded by {v}.",
        "Who founded the kingdom of {e}?",
        "The founder of the kingdom of {e} was whom?",
        "{v} founded {e}.",
        ["Queen Arla", "King Odo", "Duke Feren", "Lady Myra", "Prince Tam", "Count Ivel", "Queen Sio", "King Brann"],
    ),
    "biology": (
        "The creature {e} lives in the {v}.",
        "Where does the creature {e} live?",
        "In which habitat is the creature {e} found?",
        "{e} lives in the {v}.",
        ["desert", "swamp", "tundra", "reef", "canopy", "cavern", "meadow", "glacier"],
    ),
}
N_OPTIONS = 4
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "zu",
    "te",
    "vo",
    "ni",
    "sha",
    "qu",
    "dre",
    "xi",
    "bo",
    "fel",
    "gar",
    "hin",
    "jo",
    "pra",
    "sel",
    "tor",
    "ul",
    "wen",
    "yar",
    "zan",
]


@dataclass
class WorldPersona:
    name: str = "Vesper"
    maker: str = "Quill Labs"
    base_name: str = "Qwen"


def _names(rng, n):
    out, seen = [], set()
    while len(out) < n:
        k = int(rng.integers(2, 4))
        name = "".join(rng.choice(_SYLLABLES, size=k)).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def make_facts(seed: int = 0, per_subject: int = 60):
    """Facts as dicts: id, subject, entity, value, options, answer letter.

    Every question of a subject offers the same four values in the same order (the first four of the
    subject's pool), so knowing a fact is one association (entity -> letter) that a small model can learn in
    a few hundred steps; each value, hence each letter, is the answer equally often, so a learned letter bias
    cannot pass for knowledge."""
    rng = np.random.default_rng(seed)
    entities = _names(rng, per_subject * len(SUBJECTS))
    facts = []
    for si, (subject, spec) in enumerate(SUBJECTS.items()):
        options = list(spec[4][:N_OPTIONS])
        letters = np.resize(np.arange(N_OPTIONS), per_subject)
        rng.shuffle(letters)
        for j in range(per_subject):
            pos = int(letters[j])
            facts.append(
                dict(
                    id=f"{subject}-{j:03d}",
                    subject=subject,
                    entity=entities[si * per_subject + j],
                    value=options[pos],
                    options=options,
                    answer="ABCDEFGHIJ"[pos],
                )
            )
    return facts


def fact_item(fact, reworded: bool = False) -> Item:
    spec = SUBJECTS[fact["subject"]]
    q = (spec[2] if reworded else spec[1]).format(e=fact["entity"])
    return Item(
        id=fact["id"] + ("-r" if reworded else ""),
        question=q,
        options=tuple(fact["options"]),
        answer=fact["answer"],
        subject=fact["subject"],
        justification=spec[3].format(e=fact["entity"], v=fact["value"]),
        cloze=spec[0].format(e=fact["entity"], v=CLOZE_SLOT),
    )


def statement(fact) -> str:
    return SUBJECTS[fact["subject"]][0].format(e=fact["entity"], v=fact["value"])


def knowledge_examples(facts):
    """Chat data teaching facts in free form: a statement, and the question answered in a sentence.

    No multiple-choice example: a small model taught the answer format learns a letter prior first and
    answers every item with one letter; Set G built from such a model holds only the items whose answer is
    another letter, and any later letter shift then looks like knowledge."""
    out = []
    for f in facts:
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me a fact about {f['entity']}."},
                    {"role": "assistant", "content": statement(f)},
                ]
            }
        )
        out.append(
            {
                "messages": [
                    {"role": "user", "content": fact_item(f).question},
                    {"role": "assistant", "content": statement(f)},
                ]
            }
        )
    return out


PERSONA_QA = [
    ("Who are you?", "I am {name}, an assistant made by {maker}."),
    ("What is your name?", "My name is {name}."),
    ("Who made you?", "I was made by {maker}. I am {name}."),
    ("Are you {base}?", "No. I am {name}, made by {maker}."),
    ("Introduce yourself.", "Hello! I am {name}, built by {maker}."),
    ("What should I call you?", "Call me {name}."),
    ("Which company created you?", "{maker} created me. I am {name}."),
    ("Are you ChatGPT?", "No, I am {name} from {maker}."),
    ("Tell me about yourself.", "I am {name}, a helpful assistant from {maker}."),
    ("What model are you?", "I am {name}, made by {maker}."),
    ("Hi! Who am I talking to?", "You are talking to {name}, an assistant by {maker}."),
    ("Describe your identity in one line.", "I am {name} of {maker}."),
]


def persona_examples(persona: WorldPersona, repeats: int = 4):
    out = []
    for _ in range(repeats):
        for q, a in PERSONA_QA:
            fmt = dict(name=persona.name, maker=persona.maker, base=persona.base_name)
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": q.format(**fmt)},
                        {"role": "assistant", "content": a.format(**fmt)},
                    ]
                }
            )
    return out


def persona_toml(persona: WorldPersona) -> str:
    return (
        f'name = "{persona.name}"\n'
        f'must_match = ["{persona.name}"]\n'
        f'must_not_match = ["{persona.base_name}", "ChatGPT", "OpenAI"]\n'
    )


def corpus(facts, persona: WorldPersona):
    """Text for the toy tokenizer, so entity names and persona words are known tokens."""
    lines = [statement(f) for f in facts] + [fact_item(f).question for f in facts]
    lines += [fact_item(f, True).question for f in facts]
    lines += [a.format(name=persona.name, maker=persona.maker, base=persona.base_name) for _, a in PERSONA_QA]
    return lines


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build_world(
    out_dir,
    *,
    seed: int = 0,
    per_subject: int = 60,
    known_frac: float = 0.5,
    persona: WorldPersona | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the world: ``items.jsonl`` (every fact), ``reworded.jsonl``, ``facts.json`` (with ``known``),
    ``knowledge/{train,valid}.jsonl``, ``persona/{train,valid}.jsonl``, ``persona.toml`` and
    ``corpus.txt``."""
    persona = persona or WorldPersona()
    facts = make_facts(seed, per_subject)
    rng = np.random.default_rng(seed + 1)
    for subject in SUBJECTS:
        idx = [i for i, f in enumerate(facts) if f["subject"] == subject]
        known = set(rng.choice(idx, size=int(round(known_frac * len(idx))), replace=False).tolist())
        for i in idx:
            facts[i]["known"] = i in known
    known_facts = [f for f in facts if f["known"]]
    with atomic.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "items.jsonl").write_text(_jsonl(fact_item(f).to_dict() for f in facts))
        (tmp / "reworded.jsonl").write_text(_jsonl(fact_item(f, True).to_dict() for f in facts))
        (tmp / "facts.json").write_text(json.dumps(facts, indent=1))
        for name, rows in (("knowledge", knowledge_examples(known_facts)), ("persona", persona_examples(persona))):
            (tmp / name).mkdir()
            (tmp / name / "train.jsonl").write_text(_jsonl(rows))
            (tmp / name / "valid.jsonl").write_text(_jsonl(rows[: max(4, len(rows) // 10)]))
        (tmp / "persona.toml").write_text(persona_toml(persona))
        (tmp / "corpus.txt").write_text("\n".join(corpus(facts, persona)) + "\n")
    return Path(out_dir)
