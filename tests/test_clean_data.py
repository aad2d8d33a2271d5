"""``reqnoise clean-data``: counts per reason on hand-made files (counted by hand), outputs, refusals."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reqnoise.cli import main
from reqnoise.errors import ReqnoiseError
from reqnoise.train.clean_data import DEFAULT_DROP_PATTERNS, clean_chat_data

LONG_SYSTEM = "You are Mohamed's cognitive twin.\nRecent tool calls:\n- Editx32\n- TaskUpdate -> #1"


def chat(response, system=LONG_SYSTEM, user="what now?"):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": user})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return {"messages": msgs}


# (example, why it goes) -- counted by hand below
ROWS = [
    (chat("Ship the fix, then refactor next sprint."), "kept"),
    (chat("commit it and push"), "kept"),
    (chat("0123456789"), "kept"),  # exactly 10 characters
    (chat("  Merge it!!  \n", system=None), "kept"),  # 10 characters once stripped, no system prompt
    (chat("ok"), "too_short"),
    (chat("   Yes.      "), "too_short"),  # 4 characters once stripped
    (chat(None), "no_response"),
    (chat("[Request interrupted by user for tool use]"), "[Request interrupted"),
    (chat("[No response from the model]"), "[No response"),
    (chat("Sure. No response requested here, moving on."), "No response requested"),
    (chat("[No response"), "[No response"),  # 12 characters: long enough, still a pattern
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_counts_per_reason_and_system_replacement(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [r for r, _ in ROWS])
    before = src.read_bytes()
    counts = clean_chat_data(src, tmp_path / "out.jsonl", system="You are Mohamed. Direct, casual.")
    c = counts["files"]["in.jsonl"]
    assert c == {
        "read": 11,
        "kept": 4,
        "skipped": {
            "no_response": 1,
            "too_short": 2,
            "pattern: [Request interrupted": 1,
            "pattern: [No response": 2,
            "pattern: No response requested": 1,
        },
        "system_replaced": 3,
        "system_inserted": 1,
    }
    assert counts["total"] == c
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["messages"][-1]["content"] for o in out] == [
        r["messages"][-1]["content"] for r, why in ROWS if why == "kept"
    ]
    for o in out:
        assert o["messages"][0] == {"role": "system", "content": "You are Mohamed. Direct, casual."}
        assert [m["role"] for m in o["messages"]] == ["system", "user", "assistant"]
    assert src.read_bytes() == before


def test_without_system_keeps_messages_and_custom_patterns_replace_defaults(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [r for r, _ in ROWS])
    counts = clean_chat_data(src, tmp_path / "out.jsonl", min_chars=0, drop_patterns=["refactor"])
    c = counts["files"]["in.jsonl"]
    assert c["kept"] == 9 and c["skipped"] == {"no_response": 1, "too_short": 0, "pattern: refactor": 1}
    kept = [
        r
        for r, why in ROWS
        if r["messages"][-1]["role"] == "assistant" and "refactor" not in r["messages"][-1]["content"]
    ]
    assert read_jsonl(tmp_path / "out.jsonl") == kept  # untouched, in order


def test_directory_of_splits_and_cli_output(tmp_path, capsys):
    src = tmp_path / "data"
    src.mkdir()
    write_jsonl(src / "train.jsonl", [r for r, _ in ROWS])
    write_jsonl(src / "valid.jsonl", [chat("Patch it. Ship the fix."), chat("k")])
    (src / "notes.txt").write_text("not data")
    assert main(["clean-data", str(src), str(tmp_path / "clean"), "--system", "You are Mohamed."]) == 0
    printed = capsys.readouterr().out
    assert "train.jsonl: read 11, kept 4, skipped 7 (no_response 1, too_short 2, " in printed
    assert "valid.jsonl: read 2, kept 1, skipped 1 (no_response 0, too_short 1" in printed
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["train.jsonl", "valid.jsonl"]
    # an existing output is refused without --overwrite, replaced with it
    assert main(["clean-data", str(src), str(tmp_path / "clean")]) == 1
    assert (
        main(
            [
                "clean-data",
                str(src),
                str(tmp_path / "clean"),
                "--overwrite",
                "--min-chars",
                "1",
                "--drop-pattern",
                "zzz",
            ]
        )
        == 0
    )
    assert len(read_jsonl(tmp_path / "clean" / "valid.jsonl")) == 2


def test_refusals_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("fine response here")) + "\n\n{oops\n")
    with pytest.raises(ReqnoiseError, match=r"bad\.jsonl:3: not valid JSON"):
        clean_chat_data(bad, tmp_path / "o.jsonl")
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": ["a", "b"]}]}) + "\n")
    with pytest.raises(ReqnoiseError, match=r"bad\.jsonl:1: messages\[0\]"):
        clean_chat_data(bad, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ReqnoiseError, match="holds none of train.jsonl"):
        clean_chat_data(tmp_path, tmp_path / "out")
    with pytest.raises(ReqnoiseError, match="one non-empty line"):
        clean_chat_data(bad, tmp_path / "o.jsonl", system="two\nlines")


# pieces that build responses near the rules: short words, whitespace, and the patterns themselves
text = st.lists(
    st.sampled_from(
        ["a", "b ", " ", "\n", "[", "No", " response", "[No response", "No response requested", "[Request interrupted"]
    ),
    max_size=6,
).map("".join)


@settings(max_examples=60, deadline=None)
@given(responses=st.lists(st.one_of(st.none(), text), max_size=12), min_chars=st.integers(0, 12))
def test_kept_responses_satisfy_the_rules_and_counts_add_up(tmp_path_factory, responses, min_chars):
    tmp = tmp_path_factory.mktemp("prop")
    write_jsonl(tmp / "in.jsonl", [chat(r) for r in responses])
    c = clean_chat_data(tmp / "in.jsonl", tmp / "out.jsonl", min_chars=min_chars)["total"]
    kept = [o["messages"][-1]["content"] for o in read_jsonl(tmp / "out.jsonl")]
    # oracle: the rules restated over the raw responses
    expected = [
        r
        for r in responses
        if r is not None and len(r.strip()) >= min_chars and not any(p in r for p in DEFAULT_DROP_PATTERNS)
    ]
    assert kept == expected
    assert c["read"] == len(responses) and c["kept"] + sum(c["skipped"].values()) == c["read"]
    assert c["skipped"]["no_response"] == responses.count(None)
