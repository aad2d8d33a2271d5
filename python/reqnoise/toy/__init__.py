"""The embedded model, its tokenizer, the synthetic world and the demo."""
