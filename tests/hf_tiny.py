"""Tiny randomly initialised Hugging Face causal LMs (no downloads) shared by the tests."""

from __future__ import annotations

import torch

ARCHS = ("qwen2", "llama", "gpt2", "mistral_sliding")


def tiny_causal_lm(arch: str, seed: int = 0, vocab_size: int = 50):
    """A 2-layer model of ``arch`` over ``vocab_size`` tokens (pad 0, eos 1, bos 2, as in the
    built-in tiny tokenizer).

    ``initializer_range=0.4`` makes the distributions peaked, so a position or shift bug
    cannot hide in a near-uniform softmax. ``mistral_sliding`` attends to a window of 3.
    """
    from transformers import (
        GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
        Qwen2Config, Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    special = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.4)
    layers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **layers, **special))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **layers, **special))
    elif arch == "mistral_sliding":
        model = MistralForCausalLM(MistralConfig(sliding_window=3, **layers, **special))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **special))
    else:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    return model.float().eval()
