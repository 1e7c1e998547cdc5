"""Trainer options beyond the default: verl parquet data, LoRA, gradient checkpointing, eval CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from informative import PREFIX_RANK
import torch

from rpgrl.cli import main
from rpgrl.config import load_config
from rpgrl.data.procedural import addition_splits
from rpgrl.models.loading import load_policy
from rpgrl.loop.tracking import read_metrics
from rpgrl.loop.trainer import Trainer

pytestmark = pytest.mark.medium


def write_verl_parquet(path: Path, problems, repeat: int = 1, source: str = "math_dapo") -> Path:
    """Rows in the verl layout of docs/math.md §9 (the layout of the AIME/AMC eval files)."""
    rows = []
    for i, ex in enumerate(problems):
        for _ in range(repeat):
            rows.append({
                "data_source": source,
                "prompt": ex.messages,
                "ability": "MATH",
                "reward_model": {"ground_truth": ex.ground_truth, "style": "rule"},
                "extra_info": {"index": i, "raw_problem": ex.messages[0]["content"], "split": "test"},
            })
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def tiny_model_dir(tiny_overrides) -> Path:
    """The warm-started tiny model as a plain save_pretrained directory."""
    t = Trainer(load_config(overrides=tiny_overrides()), log=lambda *a: None)
    return Path(t.data.model_path)


def test_train_on_verl_parquet_with_a_model_path(tiny_model_dir, tiny_overrides, tmp_path):
    train, test = addition_splits(test_size=16)
    train_file = write_verl_parquet(tmp_path / "train.parquet", train[:64])
    val_file = write_verl_parquet(tmp_path / "val.parquet", test[:6], repeat=4, source="aime2025")
    cfg = load_config(overrides=tiny_overrides(
        f"model.path={tiny_model_dir}", f"data.train_files=[{train_file}]", f"data.val_files=[{val_file}]",
        "eval.k=2", "eval.temperature=1.0",
    ))
    summary = Trainer(cfg, log=lambda *a: None).train()
    assert summary["steps"] == 2
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r]
    assert rows[-1]["eval/aime2025/n_problems"] == 6  # 4 repeats of each problem de-duplicated
    assert rows[-1]["eval/aime2025/n_samples"] == 12  # k = 2 samples each
    assert "eval/aime2025/pass@2" in rows[-1]


def test_lora_and_gradient_checkpointing(tiny_overrides, tmp_path):
    cfg = load_config(overrides=tiny_overrides(
        "model.lora.enabled=true", "model.lora.r=4", "model.lora.target_modules=q_proj,v_proj",
        "model.gradient_checkpointing=true", "optim.lr=1e-2",
        f"reward_fn={Path(__file__).parent / 'scorers.py'}:parity",
    ))
    t = Trainer(cfg, log=lambda *a: None)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    t.train()
    for n, p in t.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen base weight {n} changed"
    merged = load_policy(tmp_path / "run" / "final", device=torch.device("cpu"), dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # adapters merged on save


def test_eval_cli_writes_mean_and_pass_at_k(tiny_model_dir, tmp_path, capsys):
    _, test = addition_splits(test_size=16)
    data = write_verl_parquet(tmp_path / "amc.parquet", test[:5], source="amc_23")
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--k", "4",
               "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())[str(data)]
    assert res["overall"]["n_problems"] == 5 and res["overall"]["n_samples"] == 20
    assert set(res["overall"]) >= {"mean@4", "pass@1", "pass@2", "pass@4"}
    assert res["overall"]["pass@1"] == pytest.approx(res["overall"]["mean@4"])
    assert res["overall"]["pass@1"] <= res["overall"]["pass@2"] <= res["overall"]["pass@4"]
    assert "mean@4" in capsys.readouterr().out


def test_train_cli_rejects_bad_config_before_loading(capsys):
    rc = main(["train", "algorithm.dual_clip=0.5"])
    assert rc == 2
    assert "algorithm.dual_clip: dual_clip must be > 1 (or None to disable), got 0.5" in capsys.readouterr().err


def test_dropout_is_disabled_so_logprobs_are_deterministic(tiny_model_dir):
    """With LoRA dropout 0.5 left on, two train-mode passes would be two different policies."""
    from rpgrl.config import LoraConfig
    from rpgrl.models.logprobs import sequence_logprobs

    lora = LoraConfig(enabled=True, r=4, dropout=0.5, target_modules="q_proj,v_proj")
    model = load_policy(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32, lora=lora)
    assert model.training
    ids = torch.tensor([[12, 13, 5, 14, 15, 20, 3, 10, 11]])
    mask = torch.ones_like(ids)
    a, _ = sequence_logprobs(model, ids, mask, 6)
    b, _ = sequence_logprobs(model, ids, mask, 6)
    assert torch.equal(a, b)


def test_optimizer_steps_per_batch_are_the_configs_when_dynamic_sampling_keeps_fewer_groups():
    """8 prompts in mini-batches of 1 prompt: 8 optimizer steps whether 8, 3 or 1 groups were
    kept (the paper's and verl's count), never more than one per sequence."""
    from rpgrl.config import load_config
    from rpgrl.loop.schedule import mini_batch_schedule, num_mini_batches

    cfg = load_config(None, ["trainer.prompts_per_step=8", "trainer.mini_batch_prompts=1", "rollout.n=4",
                             "trainer.micro_batch_sequences=4",
                             "algorithm.dynamic_sampling.enabled=true"])
    assert [num_mini_batches(cfg, 4 * k) for k in (8, 3, 1)] == [8, 8, 4]
    rows = mini_batch_schedule(12, 8, 1, seed=0, step=1)
    assert len(rows) == 8 and sorted(torch.cat(rows).tolist()) == list(range(12))


def test_pi_old_from_the_sampler_skips_the_pass_and_changes_nothing_but_round_off(tiny_overrides, tmp_path,
                                                                                   monkeypatch):
    """rollout.sampler_logprobs (the default): off-policy, pi_old's log-probs and the entropy come
    from the sampler's logits, no decoder pass runs for them, and the step is the one the pass
    gives -- the same samples and, to float32 round-off, the same losses and weights. On-policy
    (pi_old is the update's own forward) and under bf16 the sampler returns none."""
    from rpgrl.config import load_config
    from rpgrl.loop.collect import wants_sampler_logprobs
    from rpgrl.loop.trainer import Trainer
    from rpgrl.loop.tracking import read_metrics

    passes = []
    original = Trainer._logprobs
    monkeypatch.setattr(Trainer, "_logprobs", lambda self, *a, **k: (passes.append(1), original(self, *a, **k))[1])
    firsts = {}
    for flag in ("true", "false"):
        passes.clear()
        # PREFIX_RANK: a tie-free scorer, so the groups have signal whatever is drawn (tests/informative.py)
        cfg = load_config(overrides=tiny_overrides(f"rollout.sampler_logprobs={flag}", "trainer.total_steps=1",
                                                   PREFIX_RANK, f"output_dir={tmp_path / flag}"))
        Trainer(cfg, log=lambda *a: None).train()
        assert len(passes) == (flag == "false")
        firsts[flag] = next(r for r in read_metrics(tmp_path / flag) if "actor/loss" in r)
    on, off = firsts["true"], firsts["false"]
    assert on["batch/first_round_digest"] == off["batch/first_round_digest"]
    assert on["actor/coef_pg_abs"] > 1e-3 and on["actor/importance_weight_max"] > 1.0 + 1e-4  # off-policy signal
    for key in ("actor/loss", "actor/entropy", "actor/coef_pg_abs", "actor/importance_weight_max",
                "actor/importance_weight_mean", "actor/grad_norm", "actor/kl_rollout_k3"):
        assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-7), key

    cfg = load_config(overrides=tiny_overrides())
    assert wants_sampler_logprobs(cfg, mixed_precision=False)
    assert not wants_sampler_logprobs(cfg, mixed_precision=True)
    assert not wants_sampler_logprobs(load_config(overrides=tiny_overrides("trainer.mini_batch_prompts=4")), False)
    assert not wants_sampler_logprobs(load_config(overrides=tiny_overrides("rollout.sampler_logprobs=false")), False)
