"""The built-in tiny model and tokenizer, built locally with no downloads.

They are ordinary Hugging Face objects (``Qwen2ForCausalLM`` + ``PreTrainedTokenizerFast``),
saved with ``save_pretrained`` and reloaded through ``AutoModelForCausalLM`` like any hub
model, so the CPU default exercises exactly the code path a real run uses. Sizes were
chosen by measurement (README, "What the CPU default is"): ~1M parameters learn 2-digit
addition by RL in minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

#: The answer marker is one token so that "Answer:N" costs few generation steps.
ANSWER_TOKEN = "Answer:"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
CHARACTERS = tuple("0123456789+-*=()?.,: QA")

#: Chat template: the user's content followed by "=" as the generation prompt. The system
#: and assistant roles are rendered too so multi-turn SFT data stays well-formed.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 128


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with ``Answer:`` as a single token."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, ANSWER_TOKEN, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    pattern = Regex(f"{ANSWER_TOKEN}|.")
    core.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig | None = None,
                     seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised ~1M-parameter Qwen2 decoder sized for the tokenizer."""
    import torch

    cfg = cfg or TinyModelConfig()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
