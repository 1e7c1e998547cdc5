"""Models: loading any HF causal LM (or a GGUF), the built-in tiny model and its warm start, memory-bounded log-probs with shared prompts, FLOP accounting."""
