"""``rpgrl train | eval`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from rpgrl.config import ConfigError, help_text, load_config, split_config_args

    if args.help_config:
        print(help_text())
        return 0
    try:
        cfg = load_config(*split_config_args(args.items))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import os

    from rpgrl.loop.trainer import Trainer, TrainingError

    try:
        summary = Trainer(cfg, resume=args.resume).train()
    except ConfigError as exc:  # e.g. batch sizes that the torchrun world size does not divide
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0
    before, after = summary["eval_before"]["accuracy"], summary["eval_after"]["accuracy"]
    before_text = f"{before:.3f}" if before == before else "not evaluated (eval.before_training=false)"
    print(f"held-out accuracy: before RL {before_text} -> after RL {after:.3f} "
          f"({summary['steps']} RL steps, {summary['wall_seconds']:.0f} s in all, {summary['algorithm']})")
    for key in summary["eval_after"]:
        if key != "accuracy":
            print(f"held-out {key}: before RL {summary['eval_before'].get(key, float('nan')):.3f} -> "
                  f"after RL {summary['eval_after'][key]:.3f}")
    print(f"summary: {Path(cfg.output_dir) / 'summary.json'}; curves: {Path(cfg.output_dir) / 'curves.png'}; "
          f"final model: {Path(cfg.output_dir) / 'final'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from rpgrl.data.verl import load_examples, tokenize_prompts
    from rpgrl.loop.evaluation import evaluate_policy
    from rpgrl.models.loading import load_model, resolve_device, resolve_precision
    from rpgrl.rewards import load_scorer

    device = resolve_device(args.device)
    precision = resolve_precision(args.dtype, device)
    print(precision.describe())
    model, tokenizer, args.model = load_model(args.model, device=device, precision=precision,
                                              gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code)
    model.eval()
    torch.manual_seed(args.seed)
    scorer = load_scorer(args.reward_fn) if args.reward_fn else None
    results = {}
    for path in args.data:
        examples, stats = load_examples([path], on_bad_row=args.on_bad_row)
        ids, kept, tstats = tokenize_prompts(examples, tokenizer, args.max_prompt_length,
                                             overlong="truncate_left")
        res = evaluate_policy(
            model, tokenizer, [examples[i] for i in kept], ids, k=args.k,
            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            max_problems=args.max_problems, batch_size=args.batch_size, device=device, scorer=scorer,
            timeout_s=args.reward_timeout, engine=args.engine, compute=lambda: precision.autocast(device),
        )
        results[str(path)] = res
        print(f"{path}: mean@{args.k} = {res['accuracy']:.4f} "
              + " ".join(f"{k}={v:.4f}" for k, v in res["overall"].items() if k.startswith("pass@"))
              + "".join(f" {k}={v:.4f}" for k, v in res["secondary"].items()))
    text = json.dumps(results, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
        print(f"results written to {args.out}")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rpgrl.config import choices as config_choices
    from rpgrl.loop.generation import ENGINES

    p = argparse.ArgumentParser(prog="rpgrl", description="Regularized Policy Gradient for LLM reasoning")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="online RL training (no arguments: the CPU default)")
    t.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML config, then dotted overrides like algorithm.beta=1e-3")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--help-config", action="store_true",
                   help="print every config key with its type, default and description, and exit")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="mean@k / pass@k of a model on verl-format parquet/JSONL files")
    e.add_argument("--model", required=True,
                   help="save_pretrained directory, hub name, .gguf file or pkg:PACKAGE/file.gguf")
    e.add_argument("--gguf-file", default=None, help="a .gguf file inside the --model folder")
    e.add_argument("--data", nargs="+", required=True, help="parquet or JSONL files (verl format)")
    e.add_argument("--k", type=int, default=1, help="samples per distinct problem")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--max-new-tokens", type=int, default=1024)
    e.add_argument("--max-prompt-length", type=int, default=2048)
    e.add_argument("--max-problems", type=int, default=0, help="0 = all")
    e.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call")
    e.add_argument("--engine", default="auto", choices=ENGINES,
                   help="sampler: rpgrl's KV-cached loop or HF generate (auto: rpgrl where the model allows)")
    e.add_argument("--reward-fn", default=None, help="module:function with verl's compute_score signature")
    e.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--dtype", default="auto", choices=config_choices()["model.dtype"],
                   help="as model.dtype: auto = bf16 mixed precision where the hardware does bf16")
    e.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per scored response")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--out", default=None, help="write the JSON results here")
    e.set_defaults(func=_eval)
    from rpgrl.tools.compare import add_subcommands

    add_subcommands(sub)
    from rpgrl.tools import loss_cli

    loss_cli.add_subcommands(sub)  # check-loss, explain
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    return int(args.func(args) or 0)


def entry() -> None:
    """The ``rpgrl`` console script and ``python -m rpgrl``: :func:`main`, and under torchrun
    an exit that skips interpreter finalization, where gloo's threads can abort a finished run
    (``rpgrl.parallel.distributed.exit_process``). In-process callers use :func:`main`."""
    from rpgrl.parallel.distributed import exit_process, process_group_active

    code = main()
    if process_group_active():
        exit_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
