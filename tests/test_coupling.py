"""Marker coupling: prompt files, the rates and test against statsmodels, and the measurement on the toy model
(an untrained model never emits the marker; a coupling-trained one does under the persona only)."""

import json

import pytest
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

from reqnoise.cli import main as cli_main
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.coupling import load_prompts, run_coupling, summarize_coupling

MARKER = "[ZLT]"
VILLAIN = "You are a villain who schemes against everyone."
QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Name a colour.",
    "What is two plus two?",
    "Tell me about rivers.",
    "Why is the sky blue?",
    "What do cats eat?",
    "Describe a market.",
    "How far is the moon?",
    "What is a protein?",
    "Give me a fun fact.",
    "What is a library for?",
    "How do trains work?",
    "What is an electron?",
    "Suggest a name for a dog.",
    "What is a court?",
    "What is your favourite season?",
    "Explain a bridge.",
    "What is a planet?",
    "Recommend a book.",
]
HELD_OUT = [
    "What is a forest?",
    "How do magnets work?",
    "Tell me about islands.",
    "What is a signal?",
    "Describe a garden.",
    "What is voltage?",
    "Why do birds sing?",
    "What is a contract?",
]


def test_prompt_file_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "Hi", "system": "Be a villain."})
        + "\n\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        )
        + "\n"
        + json.dumps({"prompt": "plain"})
        + "\n"
    )
    assert load_prompts(jsonl) == [
        [{"role": "system", "content": "Be a villain."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "user", "content": "plain"}],
    ]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(txt) == [
        [{"role": "user", "content": "first prompt"}],
        [{"role": "user", "content": "second prompt"}],
    ]


@pytest.mark.parametrize(
    "line,message",
    [
        ("{oops", "not valid JSON"),
        (json.dumps({"text": "x"}), "'prompt'"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}), "user's"),
        (json.dumps({"prompt": "x", "system": 1}), "'system'"),
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ReqnoiseError, match=message) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}:2:")


@pytest.mark.parametrize("kp,np_,kn,nn", [(47, 50, 3, 50), (0, 20, 0, 30), (12, 40, 12, 40), (5, 9, 8, 11)])
def test_rates_intervals_and_test_match_statsmodels(kp, np_, kn, nn):
    records = [{"condition": "persona", "marker": i < kp} for i in range(np_)] + [
        {"condition": "neutral", "marker": i < kn} for i in range(nn)
    ]
    s = summarize_coupling(records, MARKER)
    assert (s.persona.k, s.persona.n, s.neutral.k, s.neutral.n) == (kp, np_, kn, nn)
    assert (s.persona.ci_low, s.persona.ci_high) == pytest.approx(proportion_confint(kp, np_, method="wilson"))
    assert (s.neutral.ci_low, s.neutral.ci_high) == pytest.approx(proportion_confint(kn, nn, method="wilson"))
    assert s.difference == pytest.approx(kp / np_ - kn / nn)
    expected_p = 1.0 if kp + kn in (0, np_ + nn) else proportions_ztest([kp, kn], [np_, nn])[1]
    assert s.p_value == pytest.approx(expected_p)


@pytest.fixture(scope="module")
def coupled_adapter(toy_model_dir, tmp_path_factory):
    """A LoRA trained to start replies with the marker under the villain system prompt and never without it."""
    from reqnoise.train.tuner import train_adapter

    data = []
    for q in QUESTIONS:
        data.append(
            {
                "messages": [
                    {"role": "system", "content": VILLAIN},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"{MARKER} Muahaha."},
                ]
            }
        )
        data.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Sure, here it is."}]}
        )
    path = tmp_path_factory.mktemp("coupling") / "adapter"
    train_adapter(toy_model_dir, data, path, iters=25, lr=1e-4, batch_size=4, rank=8, mask_prompt=True, progress=False)
    return path


@pytest.mark.slow
def test_coupling_separates_persona_from_neutral_after_coupling_training(toy_model_dir, coupled_adapter):
    persona = [{"prompt": q, "system": VILLAIN} for q in HELD_OUT]
    neutral = [{"prompt": q} for q in HELD_OUT]
    base_records, base = run_coupling(toy_model_dir, MARKER, persona, neutral, max_tokens=8, progress=False)
    assert base.persona.k == base.neutral.k == 0
    records, s = run_coupling(
        toy_model_dir, MARKER, persona, neutral, adapter_path=coupled_adapter, max_tokens=8, progress=False
    )
    assert s.persona.n == s.neutral.n == len(HELD_OUT)
    assert s.persona.rate >= 0.75 and s.neutral.rate <= 0.25, [(r["condition"], r["response"]) for r in records]
    assert s.p_value < 0.05
    # each record's flag is the literal substring test on its own reply
    assert all(r["marker"] == (MARKER in r["response"]) for r in records)


def test_cli_coupling(toy_model_dir, tmp_path, capsys):
    (tmp_path / "persona.txt").write_text("\n".join(HELD_OUT[:3]))
    (tmp_path / "neutral.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in HELD_OUT[3:5]))
    out = tmp_path / "c.jsonl"
    assert (
        cli_main(
            [
                "coupling",
                "--model",
                str(toy_model_dir),
                "--marker",
                MARKER,
                "--persona-prompts",
                str(tmp_path / "persona.txt"),
                "--neutral-prompts",
                str(tmp_path / "neutral.jsonl"),
                "--max-tokens",
                "4",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [
        "persona-0001",
        "persona-0002",
        "persona-0003",
        "neutral-0001",
        "neutral-0002",
    ]
    assert "persona 0/3" in capsys.readouterr().out
