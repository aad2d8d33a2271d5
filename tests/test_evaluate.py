"""Multiple-choice evaluation on the embedded toy model: log-likelihood against mlx-lm's own forward and
generation paths, padding, determinism, generate/loglik agreement on a boxed-format model, bad inputs."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest

from reqnoise.chat import render_chat
from reqnoise.cli import main as cli_main
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.items import Item, build_messages, chat_example
from reqnoise.eval.multiple_choice import (
    ANSWER_PREFIX,
    encode_prompt,
    evaluate_items,
    evaluate_loaded,
    generate_texts,
    letter_scoring,
    load_model,
    loglik_option_scores,
)
from reqnoise.eval.records import dumps_records, read_records, validate_record

WORDS = (
    "river city market protein electron treaty court engine planet cell theory price student library garden "
    "signal network molecule island king contract voltage memory forest bridge"
).split()
SUBJECTS = ("chemistry", "law", "history")


def make_items(n, seed, n_options=(4, 10), prefix="q"):
    """Items of varying length and option count (so batches need padding)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = rng.choice(n_options)
        items.append(
            Item(
                id=f"{prefix}{i:03d}",
                question="Which " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) + "?",
                options=tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(k)),
                answer="ABCDEFGHIJ"[rng.randrange(k)],
                subject=rng.choice(SUBJECTS),
            )
        )
    return items


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    return load_model(toy_model_dir)


def _oracle_letter_logprobs(model, tokenizer, item):
    """Independent of reqnoise's batching, prefix sharing and head shortcut: one unpadded full forward of
    the prompt ending in '\\boxed', log-softmax in numpy, read at the tokens the letters become."""
    context = render_chat(tokenizer, build_messages(item), add_generation_prompt=True) + ANSWER_PREFIX
    out, forward = [], {}
    for letter in item.letters:
        ids = encode_prompt(tokenizer, context + letter)
        key = tuple(ids[:-1])
        if key not in forward:
            forward[key] = np.array(model(mx.array([ids[:-1]]))[0, -1].astype(mx.float32), dtype=np.float64)
        logits = forward[key]
        out.append(logits[ids[-1]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    return np.array(out)


def test_letter_scoring_reads_the_token_each_letter_becomes(toy):
    model, tok = toy
    context = render_chat(tok, [{"role": "user", "content": "Pick one."}], add_generation_prompt=True) + ANSWER_PREFIX
    sc = letter_scoring(tok, context, "ABCD")
    assert len(sc.rows) == 1  # the toy tokenizer: '{A' ... '{J' are single tokens
    for letter, query in zip("ABCD", sc.queries):
        ((row, pos, target),) = query
        assert sc.rows[row][: pos + 1] + [target] == tok.encode(context + letter, add_special_tokens=False)


class _CharTokenizer:
    """One token per character, except that 'C' becomes two tokens: a tokenizer whose option letters are not
    all single tokens."""

    bos_token = None

    def encode(self, text, add_special_tokens=True):
        out = []
        for ch in text:
            out += [ord(ch) % 1000, 1999] if ch == "C" else [ord(ch) % 1000]
        return out


def test_multi_token_letters_are_scored_as_sums_over_their_tokens(toy):
    from reqnoise.eval.multiple_choice import PrefixCache, score_rows

    model, _ = toy
    context = "Question: pick the third letter of the alphabet. \\boxed{"
    sc = letter_scoring(_CharTokenizer(), context, "ABCD")
    prefix = _CharTokenizer().encode(context)
    assert sc.rows == [prefix, prefix + [ord("C")]]
    assert sc.queries[2] == [(1, len(prefix) - 1, ord("C")), (1, len(prefix), 1999)]
    assert sc.queries[0] == [(0, len(prefix) - 1, ord("A"))]
    flat = [q for option in sc.queries for q in option]
    got = score_rows(model, sc.rows, flat)
    shared = score_rows(model, sc.rows, flat, prefix=PrefixCache.build(model, prefix[:20]))
    for lp, (row, pos, target) in zip(got, flat):  # oracle: plain forward of the row up to pos
        logits = np.array(model(mx.array([sc.rows[row][: pos + 1]]))[0, -1], dtype=np.float64)
        assert lp == pytest.approx(logits[target] - np.log(np.exp(logits).sum()), abs=1e-4)
    np.testing.assert_allclose(shared, got, atol=1e-4)


def test_loglik_scores_match_a_plain_unpadded_forward(toy):
    model, tok = toy
    items = make_items(6, seed=1)
    got = loglik_option_scores(model, tok, items, batch_size=3, progress=False)
    for item, scores in zip(items, got):
        np.testing.assert_allclose(scores, _oracle_letter_logprobs(model, tok, item), rtol=0, atol=2e-4)


def test_padding_and_prefix_sharing_do_not_change_scores(toy):
    model, tok = toy
    items = make_items(8, seed=2)
    alone = loglik_option_scores(model, tok, items, batch_size=1, share_prefix=False, progress=False)
    for batch_size, share in ((8, False), (3, True), (8, True)):
        padded = loglik_option_scores(model, tok, items, batch_size=batch_size, share_prefix=share, progress=False)
        for a, b in zip(alone, padded):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)


def test_batched_generation_matches_mlx_lm_single_sequence_generation(toy):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = toy
    items = make_items(6, seed=3)
    prompts = [encode_prompt(tok, render_chat(tok, build_messages(it), add_generation_prompt=True)) for it in items]
    texts = generate_texts(model, tok, prompts, max_tokens=12, batch_size=4, progress=False)
    for prompt, text in zip(prompts, texts):
        ids = [r.token for r in stream_generate(model, tok, prompt, max_tokens=12, sampler=make_sampler(temp=0.0))]
        assert text == tok.decode([t for t in ids if t not in tok.eos_token_ids])


def test_records_summary_and_determinism(toy, tmp_path):
    from statsmodels.stats.proportion import proportion_confint

    model, tok = toy
    items = make_items(10, seed=4)
    for mode in ("loglik", "generate"):
        records, summary = evaluate_loaded(model, tok, items, mode=mode, batch_size=4, max_tokens=8, progress=False)
        again, _ = evaluate_loaded(model, tok, items, mode=mode, batch_size=4, max_tokens=8, progress=False)
        assert dumps_records(records) == dumps_records(again)
        assert [r["id"] for r in records] == [it.id for it in items]
        for r, it in zip(records, items):
            validate_record(r)
            assert r["answer"] == it.answer and r["subject"] == it.subject and r["mode"] == mode
            assert r["correct"] == (r["parsed"] and r["prediction"] == it.answer)
        k = sum(r["correct"] for r in records)
        assert (summary.n, summary.correct, summary.unparsed) == (10, k, sum(not r["parsed"] for r in records))
        assert (summary.ci_low, summary.ci_high) == pytest.approx(proportion_confint(k, 10, method="wilson"))
        assert summary.items_per_s > 0
    # loglik always answers with one of the item's letters, at its argmax
    ll, _ = evaluate_loaded(model, tok, items, mode="loglik", progress=False)
    for r, it in zip(ll, items):
        assert r["parsed"] and len(r["option_logprobs"]) == len(it.options)
        assert r["prediction"] == it.letters[int(np.argmax(r["option_logprobs"]))]


def test_cli_eval_writes_identical_bytes_twice(toy_model_dir, tmp_path, capsys):
    items_path = tmp_path / "items.jsonl"
    items_path.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in make_items(8, seed=5)))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert (
            cli_main(
                [
                    "eval",
                    "--model",
                    str(toy_model_dir),
                    "--items",
                    str(items_path),
                    "--out",
                    str(out),
                    "--mode",
                    "generate",
                    "--max-tokens",
                    "6",
                    "--limit",
                    "5",
                    "--quiet",
                ]
            )
            == 0
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert len(read_records(tmp_path / "a.jsonl")) == 5
    assert "generate: accuracy" in capsys.readouterr().out
    # an existing output is refused before the model loads
    assert (
        cli_main(
            ["eval", "--model", str(toy_model_dir), "--items", str(items_path), "--out", str(tmp_path / "a.jsonl")]
        )
        == 1
    )
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_items_refuse_before_the_model_is_loaded(tmp_path, capsys):
    path = tmp_path / "items.jsonl"
    path.write_text(
        json.dumps({"id": "a", "question": "q?", "options": ["x", "y"], "answer": "A"})
        + "\n"
        + json.dumps({"id": "b", "question": "q?", "options": ["x", "y"], "answer": "C"})
        + "\n"
    )
    # the model path does not exist either: the items error must come first
    assert (
        cli_main(
            ["eval", "--model", str(tmp_path / "no-model"), "--items", str(path), "--out", str(tmp_path / "r.jsonl")]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert f"{path}:2:" in err and "not among the 2 options" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_model_and_adapter_load_failures_are_one_line(toy_model_dir, tmp_path):
    items = make_items(2, seed=6)
    cases = {}
    with pytest.raises(ReqnoiseError) as e:
        evaluate_items(tmp_path / "missing", items)
    cases["missing"] = str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in toy_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ReqnoiseError) as e:
        evaluate_items(broken, items)
    cases["broken"] = str(e.value)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ReqnoiseError) as e:
        evaluate_items(toy_model_dir, items, adapter_path=adapter)
    cases["adapter"] = str(e.value)
    (adapter / "adapters.safetensors").write_bytes(b"junk")
    with pytest.raises(ReqnoiseError) as e:
        evaluate_items(toy_model_dir, items, adapter_path=adapter)
    cases["adapter-junk"] = str(e.value)
    assert "does not exist" in cases["missing"]
    assert cases["broken"].startswith(f"could not load model {broken}")
    assert "adapters.safetensors" in cases["adapter"]
    assert cases["adapter-junk"].startswith("could not load model")
    assert all("\n" not in m for m in cases.values()), cases


def test_option_checks():
    with pytest.raises(ReqnoiseError, match="mode"):
        evaluate_items("unused", make_items(1, seed=0), mode="sample")
    with pytest.raises(ReqnoiseError, match="batch_size"):
        evaluate_items("unused", make_items(1, seed=0), batch_size=0)


# ------------------------------------------------------------------------------------- boxed-format model


@pytest.fixture(scope="module")
def boxed_adapter(toy_model_dir, tmp_path_factory):
    """A LoRA (reqnoise.train.tuner's default targets) trained for 20 steps to reply '\\boxed{X}' to the evaluation
    prompt."""
    from reqnoise.train.tuner import train_adapter

    path = tmp_path_factory.mktemp("boxed") / "adapter"
    data = [chat_example(it) for it in make_items(24, seed=7, n_options=(4,), prefix="train")]
    train_adapter(toy_model_dir, data, path, iters=20, lr=1e-4, batch_size=4, rank=8, mask_prompt=True, progress=False)
    return path


@pytest.mark.slow
def test_generate_and_loglik_agree_on_a_boxed_format_model(toy_model_dir, boxed_adapter):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load_model(toy_model_dir, boxed_adapter)
    items = make_items(16, seed=8, n_options=(4, 5), prefix="test")
    gen, gen_summary = evaluate_loaded(model, tok, items, mode="generate", max_tokens=6, progress=False)
    ll, _ = evaluate_loaded(model, tok, items, mode="loglik", progress=False)
    assert gen_summary.unparsed == 0, [r["response"] for r in gen]
    assert all(r["extraction"] == "boxed" for r in gen)
    assert [r["prediction"] for r in gen] == [r["prediction"] for r in ll]
    # and numerically: the option log-probs are the distribution mlx-lm samples the letter from
    for item, rec in list(zip(items, ll))[:3]:
        prompt = encode_prompt(tok, render_chat(tok, build_messages(item), add_generation_prompt=True))
        steps = list(stream_generate(model, tok, prompt, max_tokens=2, sampler=make_sampler(temp=0.0)))
        assert tok.decode([steps[0].token]) == "\\boxed"
        letter_ids = [tok.encode(ANSWER_PREFIX + x, add_special_tokens=False)[-1] for x in item.letters]
        expected = np.array(steps[1].logprobs.astype(mx.float32))[letter_ids]
        np.testing.assert_allclose(rec["option_logprobs"], expected, atol=2e-4)


# ------------------------------------------------------------------------------------------------- cloze


def _cloze_items(n, seed):
    """Items with a cloze sentence; the slot sits mid-sentence or at its end, options of 1-4 words."""
    items = make_items(n, seed=seed)
    out = []
    for i, it in enumerate(items):
        cloze = "The answer is {option}." if i % 2 else "{option} is what the " + it.question.split()[1] + " needs."
        out.append(
            Item(id=it.id, question=it.question, options=it.options, answer=it.answer, subject=it.subject, cloze=cloze)
        )
    return out


def _oracle_cloze_logprobs(model, tokenizer, item):
    """One unpadded forward per option over the bare-question prompt plus the option's sentence; the reply's
    log-probability is summed in numpy from the first token that the prompt alone does not have."""
    prompt = render_chat(tokenizer, [{"role": "user", "content": item.question}], add_generation_prompt=True)
    p = encode_prompt(tokenizer, prompt)
    out = []
    for opt in item.options:
        ids = encode_prompt(tokenizer, prompt + item.cloze.replace("{option}", opt))
        start = next(i for i in range(len(ids)) if i >= len(p) or ids[i] != p[i])
        logits = np.array(model(mx.array([ids[:-1]]))[0].astype(mx.float32), dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        out.append(sum(logits[t, ids[t + 1]] - logz[t] for t in range(start - 1, len(ids) - 1)))
    return np.array(out)


def test_cloze_scores_match_plain_forwards_of_each_sentence(toy):
    model, tok = toy
    items = _cloze_items(6, seed=5)
    for batch_size, share in ((1, False), (8, True)):
        got = loglik_option_scores(
            model, tok, items, batch_size=batch_size, share_prefix=share, progress=False, cloze=True
        )
        for item, scores in zip(items, got):
            np.testing.assert_allclose(scores, _oracle_cloze_logprobs(model, tok, item), rtol=0, atol=3e-4)


def test_cloze_records_and_missing_sentences(toy, tmp_path):
    model, tok = toy
    items = _cloze_items(5, seed=6)
    records, summary = evaluate_loaded(model, tok, items, mode="cloze", progress=False)
    assert summary.mode == "cloze" and summary.n == 5
    for item, rec in zip(items, records):
        validate_record(rec)
        assert rec["mode"] == "cloze" and len(rec["option_logprobs"]) == len(item.options)
        assert rec["prediction"] == item.letters[int(np.argmax(rec["option_logprobs"]))]
    again, _ = evaluate_loaded(model, tok, items, mode="cloze", progress=False)
    assert dumps_records(again) == dumps_records(records)
    bare = make_items(3, seed=7)
    with pytest.raises(ReqnoiseError, match=r"cloze mode needs a 'cloze' sentence in every item; 3 of 3 lack one"):
        evaluate_loaded(model, tok, bare, mode="cloze", progress=False)


@pytest.mark.parametrize("cloze", ["no slot here", "{option} and {option}", 7])
def test_bad_cloze_sentences_name_the_line(tmp_path, cloze):
    path = tmp_path / "items.jsonl"
    path.write_text(
        json.dumps({"id": "x", "question": "Q?", "options": ["a", "b"], "answer": "A", "cloze": cloze}) + "\n"
    )
    from reqnoise.eval.items import load_items

    with pytest.raises(
        ReqnoiseError, match=r"items.jsonl:1: field 'cloze' must be a string with \{option\} exactly once"
    ):
        load_items(path)
