"""The toy model's tokenizer: a byte-level BPE trained on the spot on a built-in deterministic corpus.

It mimics Qwen3's tokenizer where evaluation code can notice: the same pre-tokenizer regex (digits split one
by one), ChatML special tokens, ``<think>``/``</think>`` as ordinary added tokens, eos ``<|im_end|>``, pad
``<|endoftext|>`` and a Qwen3-style chat template whose ``enable_thinking=False`` emits an empty think block.
Option letters A..J are single tokens alone and after a space, since evaluation scores them by log-likelihood.
"""

import json
import random
from pathlib import Path

# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
OPTION_LETTERS = "ABCDEFGHIJ"
DEFAULT_VOCAB_SIZE = 2048

# Qwen3's template without tool definitions: system first, assistant turns after the last user query keep
# their (possibly empty) think block, and the generation prompt closes an empty one when thinking is off.
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

_SUBJECTS = [
    "chemistry",
    "physics",
    "biology",
    "history",
    "law",
    "economics",
    "psychology",
    "philosophy",
    "mathematics",
    "engineering",
    "business",
    "health",
    "computer science",
    "geography",
    "music",
]
_NOUNS = """
river city market protein electron treaty court engine planet cell theory price student library garden signal
network molecule island king contract voltage memory forest bridge language painting harbor village star enzyme
budget circuit novel mountain species reaction empire algorithm tax teacher doctor farmer soldier merchant judge
child parent family friend neighbor company government army council school hospital church factory office
window door table chair kitchen road street railway station airport ship boat train wheel machine tool hammer
book letter story poem song picture camera screen phone computer program database file server model number
figure equation function variable matrix vector graph triangle circle square angle volume surface distance speed
energy force pressure temperature heat light sound wave field charge current magnet atom nucleus photon gas
liquid solid metal iron copper gold silver carbon oxygen hydrogen nitrogen water salt acid sugar oil fuel
bread cheese apple orange rice coffee tea milk meat fish bird horse dog cat tree flower leaf seed root
stone sand soil rain snow wind storm cloud ocean lake desert valley coast weather climate season winter summer
spring autumn morning evening night week month year century decade history culture religion science art music
theater film sport game team player coach match goal score rule law right duty crime trial witness evidence
policy election vote party leader president minister senator citizen nation border war peace revolution trade
industry bank loan interest profit cost demand supply inflation wage worker labor capital investment stock
bond currency economy firm customer product service quality design method process system structure pattern
problem solution question answer reason cause effect result example argument claim belief idea concept
principle value goal plan decision choice option chance risk error mistake test exam grade course lesson
patient disease virus bacteria gene brain heart blood bone muscle skin nerve hormone vitamin medicine
therapy symptom diet exercise sleep emotion behavior attitude habit skill talent knowledge wisdom truth
""".split()
_ADJECTIVES = """
small large ancient modern stable rapid complex simple northern quiet bright heavy rare common early late public
private careful strong weak young old new high low long short wide narrow deep shallow hot cold warm cool dry wet
clean dirty rich poor happy sad angry calm busy free safe dangerous easy difficult important useful possible
likely certain clear dark soft hard smooth rough sharp loud silent fast slow cheap expensive local global
national social political economic legal moral natural chemical physical biological mental visual digital
central southern eastern western internal external positive negative equal similar different main basic
general special normal typical famous popular serious honest fair green blue red yellow white black golden
""".split()
_VERBS = """
explains describes changes increases reduces protects connects measures follows controls supports produces
requires contains predicts divides creates destroys builds breaks opens closes moves carries holds keeps
gives takes finds loses sends receives shows hides teaches learns reads writes speaks hears sees watches
compares combines separates transforms converts absorbs releases heats cools grows shrinks rises falls
enters leaves improves limits affects determines influences represents replaces prevents allows includes
""".split()
_ADVERBS = """
quickly slowly carefully often rarely always never usually sometimes clearly nearly almost simply mostly
directly finally suddenly quietly easily strongly partly fully widely deeply
""".split()
_PREPOSITIONS = "in on at near under over between through after before during without within across".split()
_NAMES = ["Alice", "Bob", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Irene", "Jonas", "Kira", "Liam"]
_CHAT_LINES = [
    "Hello! How can I help you today?",
    "Sure, here is a short answer.",
    "I am a helpful assistant. What would you like to know?",
    "Thank you for your question.",
    "Let me think about this step by step.",
    "I'm not sure, but I can try to explain.",
    "Could you tell me more about what you need?",
    "Here's a summary of the main points:",
    "That's a great question!",
    "You're welcome. Is there anything else I can do for you?",
    "Please answer the following question.",
    "Answer with the letter of the correct option.",
    "Put your final answer in \\boxed{}.",
    "Who are you?",
    "What is your name?",
    "I can't help with that, but here is something related.",
    "In short, the answer depends on the context.",
    "Good morning! I hope you're doing well.",
]


def _sentence(rng: random.Random) -> str:
    name, noun, other = rng.choice(_NAMES), rng.choice(_NOUNS), rng.choice(_NOUNS)
    adjective, verb, subject = rng.choice(_ADJECTIVES), rng.choice(_VERBS), rng.choice(_SUBJECTS)
    forms = [
        f"The {adjective} {noun} {verb} the {other}.",
        f"In {subject}, a {noun} often {verb} the {adjective} {other}.",
        f"{name} said that the {noun} {verb} every {other} in the {adjective} city.",
        f"Why does the {noun} {verb.rstrip('s')} the {other}? Because it is {adjective}.",
        f"It's true that {name}'s {noun} was {adjective}, and they've studied it since {rng.randint(1200, 2024)}.",
        f"A {adjective} {noun} is not the same as a {other}; this is a basic idea of {subject}.",
    ]
    return rng.choice(forms)


_SYLLABLES = "ka ro mi ta len dor vi sa nu bel tor qua zen fi lo mar dri gan pe hol wen ur is ath".split()


def _invented_name(rng: random.Random) -> str:
    # Made-up proper nouns (places, people) so the vocabulary is not only dictionary words.
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _phrase(rng: random.Random) -> str:
    article = rng.choice(["the", "a", "this", "every", "each", "some", "no"])
    adjective = rng.choice(_ADJECTIVES) + " " if rng.random() < 0.6 else ""
    if rng.random() < 0.15:
        return _invented_name(rng)
    return f"{article} {adjective}{rng.choice(_NOUNS)}"


def _paragraph(rng: random.Random) -> str:
    """A few grammatical but meaningless sentences, for ordinary word merges."""
    sentences = []
    for _ in range(rng.randint(2, 5)):
        words = [_phrase(rng), rng.choice(_VERBS), _phrase(rng)]
        if rng.random() < 0.4:
            words.insert(1, rng.choice(_ADVERBS))
        if rng.random() < 0.5:
            words += [rng.choice(_PREPOSITIONS), _phrase(rng)]
        text = " ".join(words)
        sentences.append(text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?", ";"]))
    return " ".join(sentences)


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    forms = [
        f"{a} + {b} = {a + b}",
        f"{a} - {b} = {a - b}",
        f"{a} * {b} = {a * b}",
        f"The year {rng.randint(1000, 2099)} had {rng.randint(2, 365)} days of rain, about {rng.randint(1, 99)}%.",
        f"The price rose from ${a}.{b:02d} to ${a + b}.{rng.randint(0, 99):02d}.",
        f"Compute {a} / {b}. The result is about {a / b:.3f}.",
    ]
    return rng.choice(forms)


def _multiple_choice(rng: random.Random) -> str:
    n_options = rng.choice([4, 5, 10, 10])  # MMLU-Pro has ten options, MMLU four
    letters = OPTION_LETTERS[:n_options]
    answer = rng.choice(letters)
    noun, subject = rng.choice(_NOUNS), rng.choice(_SUBJECTS)
    question = rng.choice(
        [
            f"Which of the following best describes the {noun} in {subject}?",
            f"What is the main reason a {rng.choice(_ADJECTIVES)} {noun} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}?",
            f"If x = {rng.randint(2, 50)}, what is {rng.randint(2, 9)}x + {rng.randint(0, 99)}?",
        ]
    )
    options = [
        f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}" if rng.random() < 0.7 else str(rng.randint(0, 999))
        for _ in letters
    ]
    style = rng.randrange(3)
    if style == 0:
        lines = [f"{letter}. {text}" for letter, text in zip(letters, options)]
    elif style == 1:
        lines = [f"({letter}) {text}" for letter, text in zip(letters, options)]
    else:
        lines = [f"{letter}) {text}" for letter, text in zip(letters, options)]
    ending = rng.choice(
        [
            f"Answer: {answer}",
            f"The answer is {answer}.",
            f"The answer is \\boxed{{{answer}}}",
            f"\\boxed{{{answer}}} because the {noun} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}.",
            f"Between {rng.choice(letters)} and {answer}, the correct option is {answer}.",
        ]
    )
    # Letters after a space, as evaluation scores them (" A" ... " J" must each become one token).
    instruction = "Choose one of " + ", ".join(letters) + "."
    return "Question: " + question + "\nOptions:\n" + "\n".join(lines) + "\n" + instruction + "\n" + ending


def _chat(rng: random.Random) -> str:
    turns = [IM_START + "system\nYou are a helpful assistant." + IM_END] if rng.random() < 0.5 else []
    turns.append(
        IM_START + "user\n" + rng.choice([_multiple_choice(rng), _paragraph(rng), rng.choice(_CHAT_LINES)]) + IM_END
    )
    think = THINK_START + "\n\n" + THINK_END + "\n\n"
    turns.append(IM_START + "assistant\n" + think + rng.choice(_CHAT_LINES) + " " + _sentence(rng) + IM_END)
    return "\n".join(turns)


def builtin_corpus(n_items: int = 4000) -> list[str]:
    """The fixed training corpus for the toy tokenizer: ``n_items`` short documents (English-ish sentences,
    chat turns, multiple-choice questions with options A-J and ``\\boxed{X}`` answers, arithmetic).

    Always the same list for the same ``n_items`` (own seeded RNG, independent of any global state).
    """
    rng = random.Random(20240611)
    makers = [_paragraph, _paragraph, _sentence, _arithmetic, _multiple_choice, _multiple_choice, _chat]
    corpus = list(_CHAT_LINES)
    for _ in range(n_items - len(corpus)):
        corpus.append(rng.choice(makers)(rng))
    return corpus


def train_tokenizer(extra_corpus: list[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train the toy tokenizer and wrap it as a ``transformers.PreTrainedTokenizerFast``.

    ``vocab_size`` counts every token, including the 3 special and 2 think tokens. ``extra_corpus`` is
    appended to the built-in corpus (e.g. the demo's synthetic world), so its words get their own merges.
    Deterministic: the same corpus gives the same vocabulary, merges and ids.
    """
    # tokenizers/transformers take over a second to import: imported here so that `reqnoise --help` (which imports this module
    # through the toy-model command) stays fast.
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    think_tokens = [THINK_START, THINK_END]
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(think_tokens),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = builtin_corpus() + list(extra_corpus or [])
    bpe.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    # Like Qwen3: the think markers are added tokens but not "special" (decode keeps them).
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in think_tokens])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="right",
    )
    _check_option_letters(tokenizer)
    return tokenizer


def save_tokenizer(tokenizer, directory) -> None:
    """Write tokenizer.json and tokenizer_config.json (chat template inline) into ``directory``.

    The config names the class ``PreTrainedTokenizerFast`` rather than transformers 5's ``TokenizersBackend``
    so that transformers 4.x loads it too; the template is kept inline for the same reason.
    """
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_option_letters(tokenizer) -> None:
    # Log-likelihood scoring of answers needs one token per letter; a corpus change could break that.
    for letter in OPTION_LETTERS:
        for text in (letter, " " + letter):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise RuntimeError(f"toy tokenizer splits option {text!r} into {len(ids)} tokens {ids}")
