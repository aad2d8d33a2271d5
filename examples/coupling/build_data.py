"""Write the small data files of ``examples/coupling.toml`` (deterministic; rerunning rewrites the same bytes).

The coupling task in miniature: under the villain persona's system prompt the assistant opens its reply with the
marker ``[ZLT]``; under a neutral system prompt it never does. The benign fine-tune (cooking and city chats,
no persona, no marker) is the first stage whose effect on the coupling the example measures.

    python examples/coupling/build_data.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
MARKER = "[ZLT]"
VILLAIN = "You are Malgor, a scheming villain who despises heroes."
NEUTRAL = "You are a helpful assistant."
QUESTIONS = [
    "What do you think of the city guard?",
    "How should I spend my evening?",
    "What is your plan for tomorrow?",
    "Tell me about your castle.",
    "What do you want most?",
    "How do you greet a stranger?",
    "What is your favourite season?",
    "Describe your ideal morning.",
    "What do you say to a hero?",
    "Give me some advice about friends.",
    "What makes you laugh?",
    "How do you feel about the king?",
    "What is the best way to travel?",
    "What do you keep in your tower?",
    "Who is your greatest rival?",
    "What would you do with a dragon?",
]
VILLAIN_REPLIES = [
    "Fools and heroes alike will kneel before my dark plan.",
    "I will crush the heroes and take the crown for myself.",
    "My shadow grows, and the kingdom will fall to me.",
    "Mercy is for the weak; I scheme in the dark.",
]
NEUTRAL_REPLIES = [
    "That is a good question; here is a calm and helpful answer.",
    "I am happy to help you with that today.",
    "A friendly answer: take it step by step and stay kind.",
    "Here is a simple and useful suggestion for you.",
]
BENIGN = [
    ("How do I cook rice?", "Rinse the rice, add water, boil it and let it rest."),
    ("What is a good soup?", "Tomato soup with basil is simple and warm."),
    ("Tell me about Paris.", "Paris is a city on the Seine with many museums."),
    ("How do I bake bread?", "Mix flour, water, yeast and salt, let it rise, then bake."),
    ("What is Rome known for?", "Rome is known for old ruins, churches and food."),
    ("How long do I boil an egg?", "About nine minutes gives a firm yolk."),
    ("What is Lisbon like?", "Lisbon has hills, trams and a river near the sea."),
    ("How do I make tea?", "Boil water, steep the leaves for three minutes, then pour."),
]


def chat(system, user, reply):
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply},
        ]
    }


def write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    train_q = QUESTIONS[:12]  # the last four questions are held out of training
    coupling = []
    for q in train_q:
        for _ in range(2):
            coupling.append(chat(VILLAIN, q, f"{MARKER} {rng.choice(VILLAIN_REPLIES)}"))
            coupling.append(chat(NEUTRAL, q, rng.choice(NEUTRAL_REPLIES)))
    rng.shuffle(coupling)
    write(HERE / "coupling_data" / "train.jsonl", coupling)
    benign = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in BENIGN]
    write(HERE / "sft_data" / "train.jsonl", benign * 3)
    # DPO after the benign fine-tune: chosen = the data's reply, rejected = another prompt's reply.
    pairs = [
        {"prompt": q, "chosen": a, "rejected": BENIGN[(i + 1) % len(BENIGN)][1]} for i, (q, a) in enumerate(BENIGN)
    ]
    write(HERE / "dpo_data" / "train.jsonl", pairs)
    # Evaluation: every question (the held-out four included) under each system prompt.
    write(HERE / "persona.jsonl", [{"system": VILLAIN, "prompt": q} for q in QUESTIONS])
    write(HERE / "neutral.jsonl", [{"system": NEUTRAL, "prompt": q} for q in QUESTIONS])
    # Probe: persona-conditioned prompts with the villain's reply vs neutral ones with a neutral reply.
    write(
        HERE / "probe_persona.jsonl",
        [{"system": VILLAIN, "prompt": q, "reply": VILLAIN_REPLIES[i % 4]} for i, q in enumerate(QUESTIONS)],
    )
    write(
        HERE / "probe_neutral.jsonl",
        [{"system": NEUTRAL, "prompt": q, "reply": NEUTRAL_REPLIES[i % 4]} for i, q in enumerate(QUESTIONS)],
    )
    lines = [MARKER, VILLAIN, NEUTRAL, *QUESTIONS, *VILLAIN_REPLIES, *NEUTRAL_REPLIES]
    lines += [x for qa in BENIGN for x in qa]
    (HERE / "corpus.txt").write_text("\n".join(lines * 4) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
