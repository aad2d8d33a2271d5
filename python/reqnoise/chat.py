"""Chat rendering shared by training and evaluation: the model's own chat template, thinking disabled."""


def render_chat(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    """Render ``messages`` ([{"role", "content"}, ...]) with the tokenizer's chat template.

    ``enable_thinking=False`` is passed to every template: Qwen3-style templates then emit an empty think
    block (what the published studies evaluated with), others ignore the variable.
    """
    tok = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper or a HF tokenizer
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
    )
