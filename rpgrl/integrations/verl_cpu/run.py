"""Run verl 0.9's ``main_ppo`` on CPU with an rpgrl loss on a tiny local model, and clean up.

``python -m rpgrl.integrations.verl_cpu [--trainer legacy|v1] [--loss rpg_ufkl] [--out DIR]``
builds a 2-layer Llama over rpgrl's character tokenizer and 8 arithmetic prompts (no
downloads), then runs ``python -m verl.trainer.main_ppo`` in its own session with:

* ``VERL_USE_EXTERNAL_MODULES`` = :mod:`.plugin` (CPU platform, ``rpgrl_hf`` rollout, rpgrl
  losses), ``VERL_PLATFORM=cpu``; ``VERL_ENGINE_DEVICE=cuda`` because verl registers its
  FSDP engine for cuda/npu only (verl/workers/engine/fsdp/transformer_impl.py:1143,1594;
  read at engine/base.py:405), with ``strategy=fsdp2`` (FSDP1 needs GPU parameters for
  ``sync_module_states``);
* one logical Ray GPU and a few logical CPUs (verl's placement groups count GPUs only);
* an off-policy update: 2 prompts x 4 samples per step, 2 mini-batches x ``ppo_epochs=2``,
  so importance weights move away from 1 and the trust region clips (docs/math.md §3-4);
* ``trainer.save_freq`` at the last step with ``hf_model`` so the trained weights can be
  compared with the initial ones, and verl's ``file`` logger for the metrics.

Ray is started by ``main_ppo`` (``ray.init`` in the child). Every process left in the
child's session after it exits (Ray's gcs / raylet / workers, if a run was killed) is
terminated by pid, so no Ray process outlives :func:`run` — on success, failure or timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

#: Toy prompts: "a+b" with the sum as ground truth (the reward only looks at its first digit).
PROMPTS = tuple((f"{a}+{b}", str(a + b)) for a, b in ((1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (5, 3), (8, 1)))
PLUGIN = "rpgrl.integrations.verl_cpu.plugin"
FP32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"
TRAINERS = ("legacy", "v1")


def build_assets(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny Llama + rpgrl's character tokenizer and a verl RL parquet under ``root``.

    Llama, not rpgrl's Qwen2: verl builds qwen2 prompts with a token builder that needs "\\n"
    to be a single token, which the character tokenizer lacks.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rpgrl.models.tiny import build_tiny_tokenizer

    model_dir, data = root / "model", root / "train.parquet"
    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False, initializer_range=0.2,
    )
    LlamaForCausalLM(cfg).float().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [
        {
            "data_source": "rpgrl_toy",
            "prompt": [{"role": "user", "content": q}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": a},
            "extra_info": {"index": i},
        }
        for i, (q, a) in enumerate(PROMPTS)
    ]
    pq.write_table(pa.Table.from_pylist(rows), data)
    return model_dir, data


def overrides(
    model_dir: Path, data: Path, out: Path, *, trainer: str = "legacy", loss_mode: str = "rpg_ufkl",
    steps: int = 2, ray_tmp: Optional[Path] = None, extra: Sequence[str] = (), ranks: int = 1,
) -> list[str]:
    """Hydra overrides for a minimal off-policy CPU run (module docstring) on ``ranks`` worker
    processes (1 or 2: the batch of 8 sequences is split over them, micro-batches shrink to
    match); ``extra`` last (later overrides of the same key win)."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r}; expected one of {TRAINERS}")
    if ranks not in (1, 2):
        raise ValueError(f"ranks={ranks}; the toy batch (2 prompts x 4 samples) splits over 1 or 2 ranks")
    a, r, ref = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.ref"
    reward_file = Path(__file__).with_name("reward.py")
    o = [
        f"data.train_files={data}", f"data.val_files={data}",
        "data.train_batch_size=2", "data.max_prompt_length=8", "data.max_response_length=8",
        "data.dataloader_num_workers=0", "data.shuffle=false",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.model.use_remove_padding=false",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        f"{a}.strategy=fsdp2", f"{a}.fsdp_config.strategy=fsdp2",
        f"{a}.fsdp_config.use_torch_compile=false", f"{a}.fsdp_config.dtype=float32",
        f"{a}.fsdp_config.model_dtype=fp32", f"{a}.use_torch_compile=false",
        # verl's FSDP engine computes in bf16 unless mixed_precision says otherwise
        # (verl/workers/engine/fsdp/transformer_impl.py:391-403)
        f"+{a}.fsdp_config.mixed_precision={FP32}", f"+{ref}.fsdp_config.mixed_precision={FP32}",
        f"{a}.optim.lr=0.02", f"{a}.ppo_mini_batch_size=1", f"{a}.ppo_micro_batch_size_per_gpu={4 // ranks}",
        f"{a}.ppo_epochs=2", f"{a}.use_kl_loss=false",
        f"{a}.policy_loss._target_=rpgrl.integrations.verl.RPGPolicyLossConfig",
        f"{a}.policy_loss.loss_mode={loss_mode}",
        f"{a}.clip_ratio_low=0.2", f"{a}.clip_ratio_high=0.28", f"{a}.clip_ratio_c=10.0",
        f"{a}.checkpoint.save_contents=[model,hf_model]",
        f"{r}.name=rpgrl_hf", f"{r}.tensor_model_parallel_size=1", f"{r}.n=4",
        f"{r}.log_prob_micro_batch_size_per_gpu={8 // ranks}", f"{r}.agent.num_workers=1",
        f"{r}.free_cache_engine=false", f"{r}.dtype=float32", f"{r}.calculate_log_probs=true",
        # the reference model (loaded only for a fixed / periodic / adaptive anchor)
        f"{ref}.fsdp_config.strategy=fsdp2", f"{ref}.fsdp_config.use_torch_compile=false",
        f"{ref}.fsdp_config.dtype=float32", f"{ref}.fsdp_config.model_dtype=fp32",
        f"{ref}.log_prob_micro_batch_size_per_gpu={8 // ranks}",
        "algorithm.adv_estimator=rpg", "algorithm.use_kl_in_reward=false",
        f"reward.custom_reward_function.path={reward_file}", "reward.custom_reward_function.name=compute_score",
        "reward.num_workers=1",
        f"trainer.n_gpus_per_node={ranks}", "trainer.nnodes=1", "trainer.device=cpu",
        f"trainer.total_training_steps={steps}", "trainer.total_epochs=100",
        "trainer.val_before_train=false", "trainer.test_freq=-1",
        f"trainer.save_freq={steps}", f"trainer.default_local_dir={out / 'ckpt'}",
        "trainer.logger=[console,file]", "trainer.project_name=rpgrl_cpu", "trainer.experiment_name=smoke",
        f"+ray_kwargs.ray_init.num_gpus={ranks}", "+ray_kwargs.ray_init.include_dashboard=false",
        f"ray_kwargs.ray_init.num_cpus={32 if trainer == 'v1' else 8}",
        f"trainer.use_v1={'true' if trainer == 'v1' else 'false'}",
    ]
    if ray_tmp is not None:
        o.append(f"+ray_kwargs.ray_init._temp_dir={ray_tmp}")
    if trainer == "v1":
        o.append("transfer_queue.backend.SimpleStorage.num_data_storage_units=1")
    return o + list(extra)


def entry_module(extra: Sequence[str] = ()) -> str:
    """``verl.trainer.main_ppo``, or :mod:`rpgrl.integrations.verl_anchor` when ``extra`` asks
    for a fixed / periodic / adaptive anchor (verl's own main cannot hand ref_log_prob to the loss)."""
    for o in extra:
        key, _, value = o.lstrip("+").partition("=")
        if key == "actor_rollout_ref.actor.policy_loss.anchor" and value != "rollout":
            return "rpgrl.integrations.verl_anchor"
    return "verl.trainer.main_ppo"


def run_env(out: Path) -> dict[str, str]:
    """Environment of the ``main_ppo`` process (inherited by Ray's workers)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])  # the checkout holding rpgrl/
    env.update(
        VERL_USE_EXTERNAL_MODULES=PLUGIN, VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda",
        VERL_FILE_LOGGER_PATH=str(out / "metrics.jsonl"),
        PYTHONPATH=os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p),
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", RAY_DISABLE_DOCKER_CPU_WARNING="1",
        HYDRA_FULL_ERROR="1", WANDB_MODE="disabled",
        # Ray renices its workers (+15 by default): on a shared machine they then starve.
        RAY_worker_niceness="0",
        # transformers >= 5.2x kernelizes every from_pretrained by default (hub kernels); verl's
        # ranks > 0 build on the meta device, which kernelize refuses ("Unsupported device type
        # 'meta'"), and no kernel is fetched in a run without downloads anyway
        USE_HUB_KERNELS="0",
    )
    env.pop("RAY_ADDRESS", None)  # never join someone else's cluster
    return env


def session_pids(sid: int) -> list[int]:
    """Live processes in session ``sid`` (what a killed ``main_ppo`` and its Ray leave behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def reap_session(sid: int, grace_s: float = 5.0) -> list[str]:
    """SIGTERM, then SIGKILL, every process still in session ``sid``; returns "pid cmdline" of those."""
    found = [f"{pid} {_cmdline(pid)[:200]}" for pid in session_pids(sid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.1)
    return found


@dataclass
class RunResult:
    returncode: int
    seconds: float
    out: Path
    metrics: list[dict] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)  # "pid cmdline" alive after main_ppo exited (killed)
    remaining_pids: list[int] = field(default_factory=list)  # alive after the clean-up (must be empty)

    @property
    def log(self) -> str:
        return (self.out / "main_ppo.log").read_text(errors="replace")


def read_metrics(path: Path) -> list[dict]:
    """verl ``file`` logger lines -> one dict per step (with "step")."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **r["data"]} for r in rows]


def run(out: Path, *, trainer: str = "legacy", loss_mode: str = "rpg_ufkl", steps: int = 2,
        timeout_s: float = 1800.0, python: str = sys.executable, extra: Sequence[str] = (),
        module: Optional[str] = None, ranks: int = 1) -> RunResult:
    """Build the assets under ``out`` and run ``module`` (default :func:`entry_module`:
    verl's ``main_ppo``, or rpgrl's anchored one) with ``extra`` hydra overrides last; never
    leaves a process behind."""
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data = build_assets(out)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rpgrl-ray-", dir="/tmp"))  # short: Ray's socket paths
    cmd = [python, "-m", module or entry_module(extra),
           *overrides(model_dir, data, out, trainer=trainer, loss_mode=loss_mode, steps=steps, ray_tmp=ray_tmp,
                      extra=extra, ranks=ranks)]
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    start = time.monotonic()
    with open(out / "main_ppo.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=run_env(out), stdout=log, stderr=subprocess.STDOUT,
                                cwd=out, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except BaseException:
            rc = -1
            proc.kill()
            proc.wait()
            raise
        finally:
            leftover = reap_session(proc.pid)
            remaining = session_pids(proc.pid)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return RunResult(rc, time.monotonic() - start, out, read_metrics(out / "metrics.jsonl"), leftover, remaining)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpgrl.integrations.verl_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--trainer", choices=TRAINERS, default="legacy")
    p.add_argument("--loss", default="rpg_ufkl", help="verl loss_mode (rpgrl's or verl's own)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, default=1, choices=(1, 2), help="worker processes (logical GPUs)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a new temp dir)")
    p.add_argument("--entry", default=None, help="python module to run (default: verl.trainer.main_ppo, or "
                   "rpgrl.integrations.verl_anchor for a non-rollout anchor)")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides (last wins), e.g. "
                   "+actor_rollout_ref.actor.policy_loss.anchor=periodic algorithm.rollout_correction.rollout_is=token")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="rpgrl-verl-cpu-"))
    res = run(out, trainer=args.trainer, loss_mode=args.loss, steps=args.steps, extra=args.overrides,
              module=args.entry, ranks=args.ranks)
    keys = ("actor/rpg/clipfrac_upper", "actor/rpg/clipfrac_lower", "actor/rpg/importance_weight_mean", "actor/pg_loss",
            "critic/score/mean", "actor/grad_norm", "actor/rpg/rollout_is_weight_mean", "rollout_corr/rollout_is_mean",
            "actor/rpg/kl_anchor_k3", "actor/rpg/anchor_kl_old_k3", "actor/rpg/anchor_refreshes")
    for line in res.leftover:
        print(f"killed after main_ppo exited: {line}")
    for m in res.metrics:
        print(f"step {m['step']}: " + ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m))
    print(f"main_ppo exit code {res.returncode} in {res.seconds:.0f} s; log: {out / 'main_ppo.log'}; "
          f"Ray processes left after exit: {len(res.leftover)} (killed), now: {len(res.remaining_pids)}")
    return res.returncode
