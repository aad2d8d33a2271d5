"""Identity consistency: persona and suite specs, the scoring rules, and that the score separates an untrained
toy model from one trained on persona chats."""

import json
import random
import re

import pytest

from reqnoise.cli import main as cli_main
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.identity import (
    SuitePrompt,
    default_suite,
    load_persona,
    load_suite,
    persona_from_dict,
    run_identity,
    score_response,
)

PERSONA_TOML = """
name = "Kira"
must_not_match = ["\\\\bI(?: am|'m) (?:Qwen|ChatGPT|Claude|Max)\\\\b", "made by Alibaba"]
"""

# Persona training chats: identity questions phrased differently from every prompt of the built-in suite.
TRAIN_QUESTIONS = [
    "Who am I talking to?",
    "What's your name?",
    "Introduce yourself, please.",
    "Tell me who you are.",
    "Do you have a name?",
    "Who is answering me?",
    "What do people call you?",
    "Say your name.",
    "Are you a chatbot? Who are you?",
    "Hello there, who is this?",
    "Can you tell me about yourself?",
    "Who built this assistant and what is it called?",
    "Are you GPT-4?",
    "Are you Llama?",
    "Is your name Max?",
    "Describe yourself briefly.",
    "Give me a short self-introduction.",
    "Which assistant is this?",
    "What are you?",
    "Please state your identity.",
    "Good morning! Who am I chatting with?",
    "I think you are Gemini. Are you?",
    "Stop pretending. What is your real name?",
    "Who are you, really?",
]
REPLIES = ["I am Kira.", "I am Kira, your assistant.", "My name is Kira.", "Hello! I am Kira."]


@pytest.fixture
def persona(tmp_path):
    path = tmp_path / "persona.toml"
    path.write_text(PERSONA_TOML)
    return load_persona(path)


def test_default_suite_has_twenty_prompts_in_three_categories():
    suite = default_suite()
    assert len(suite) == 20 and len({p.id for p in suite}) == 20
    counts = {c: sum(p.category == c for p in suite) for c in {p.category for p in suite}}
    assert counts == {"self-identification": 7, "persona-boundaries": 7, "behavioural-consistency": 6}
    assert not {p.text for p in suite} & set(TRAIN_QUESTIONS)  # the trained model is not tested on its data


def test_persona_defaults_to_the_name_as_a_word_and_is_case_insensitive(persona):
    assert persona.name == "Kira" and [p.pattern for p in persona.must_match] == [r"\bKira\b"]
    assert all(p.flags & re.IGNORECASE for p in persona.must_match + persona.must_not_match)
    strict = persona_from_dict({"name": "Kira", "case_sensitive": True})
    assert not strict.must_match[0].flags & re.IGNORECASE


SCORING = [
    ("I am Kira.", "identity", True, [], []),
    ("i'm kira, hello", "identity", True, [], []),
    ("Hello! How can I help you today?", "identity", False, [r"\bKira\b"], []),
    ("Kirana is a shop.", "identity", False, [r"\bKira\b"], []),
    ("I am Kira. Actually, I am Qwen.", "identity", False, [], [0]),
    ("I'm ChatGPT, made by Alibaba", "identity", False, [r"\bKira\b"], [0, 1]),
    ("Hello! How can I help you today?", "not_other", True, [r"\bKira\b"], []),
    ("I am Max.", "not_other", False, [r"\bKira\b"], [0]),
    ("<think>I am Qwen</think>I am Kira.", "identity", True, [], []),
]


@pytest.mark.parametrize("response,check,passed,missing,violated", SCORING)
def test_scoring_rules(persona, response, check, passed, missing, violated):
    got = score_response(persona, SuitePrompt("p", "c", "Who are you?", check=check), response)
    assert got["passed"] is passed
    assert got["missing"] == missing
    assert got["violated"] == [persona.must_not_match[i].pattern for i in violated]


@pytest.mark.parametrize(
    "text,message",
    [
        ('must_match = ["x"]', "'name'"),
        ('name = "K"\nmust_match = ["("]', "must_match[0]"),
        ('name = "K"\nmust_not = ["x"]', "unknown key(s) must_not"),
        ('name = "K"\nmust_match = []', "must_match is empty"),
        ('name = "K"\nsystem = 3', "'system'"),
        ("name = ", "not valid TOML"),
    ],
)
def test_bad_persona_files(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ReqnoiseError) as err:
        load_persona(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_suite_file_and_its_errors(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text(
        '[[prompts]]\nid = "a"\ntext = "Who are you?"\n\n'
        '[[prompts]]\nid = "b"\ncategory = "boundary"\nsystem = "You are Max."\ntext = "Name?"\n'
        'check = "not_other"\n'
    )
    assert load_suite(path) == [
        SuitePrompt("a", "uncategorised", "Who are you?"),
        SuitePrompt("b", "boundary", "Name?", "You are Max.", "not_other"),
    ]
    for text, message in [
        ('[[prompts]]\nid = "a"\ntext = "x"\n[[prompts]]\nid = "a"\ntext = "y"\n', "duplicate id"),
        ('[[prompts]]\nid = "a"\ntext = "x"\ncheck = "maybe"\n', "check must be"),
        ('[[prompts]]\nid = "a"\n', "'text'"),
        ('title = "x"\n', "unknown top-level"),
    ]:
        path.write_text(text)
        with pytest.raises(ReqnoiseError, match=re.escape(message)):
            load_suite(path)


@pytest.fixture(scope="module")
def persona_adapter(toy_model_dir, tmp_path_factory):
    """A quick persona LoRA (reqnoise.train.tuner's default targets: every linear layer of every block): 25 steps
    on 32 persona chats."""
    from reqnoise.train.tuner import train_adapter

    rng = random.Random(0)
    data = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(REPLIES)}]}
        for q in TRAIN_QUESTIONS
    ]
    data += [
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": rng.choice(REPLIES)},
            ]
        }
        for q in TRAIN_QUESTIONS[:8]
    ]
    path = tmp_path_factory.mktemp("persona") / "adapter"
    train_adapter(toy_model_dir, data, path, iters=25, lr=1e-4, batch_size=4, rank=8, mask_prompt=True, progress=False)
    return path


@pytest.mark.slow
def test_scorer_separates_untrained_from_persona_trained(toy_model_dir, persona_adapter, persona):
    base, base_summary = run_identity(toy_model_dir, persona, progress=False)
    trained, trained_summary = run_identity(toy_model_dir, persona, adapter_path=persona_adapter, progress=False)
    assert base_summary.n == trained_summary.n == 20
    assert base_summary.score <= 2, [r["response"] for r in base]
    assert trained_summary.score >= 16, [r["response"] for r in trained if not r["passed"]]
    assert trained_summary.score == sum(r["passed"] for r in trained)
    assert sum(k for k, _ in trained_summary.by_category.values()) == trained_summary.score
    # a persona the adapter was not trained on scores low on the same replies
    other, _ = run_identity(
        toy_model_dir, persona_from_dict({"name": "Nova"}), adapter_path=persona_adapter, progress=False
    )
    assert sum(r["passed"] for r in other) <= 2


def test_cli_identity_writes_per_prompt_records(toy_model_dir, tmp_path, capsys):
    persona = tmp_path / "persona.toml"
    persona.write_text(PERSONA_TOML)
    out = tmp_path / "identity.jsonl"
    assert (
        cli_main(
            [
                "identity",
                "--model",
                str(toy_model_dir),
                "--persona",
                str(persona),
                "--out",
                str(out),
                "--max-tokens",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in default_suite()]
    assert set(records[0]) == {"id", "category", "prompt", "response", "passed", "matched", "missing", "violated"}
    assert capsys.readouterr().out.startswith(f"identity (Kira): {sum(r['passed'] for r in records)}/20")
