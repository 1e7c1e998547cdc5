#!/usr/bin/env bash
# RPG-URKL (differentiable surrogate, Table 1/4; Algorithm 1 dual clip) on Qwen3-4B, DAPO-Math-17k, 8K responses:
# the paper's run (docs/math.md §7-8) on verl 0.9 with rpgrl's loss. Needs 8 GPUs.
# Usage: bash examples/verl/run_rpg_urkl.sh [extra hydra overrides]
set -euo pipefail
LOSS=rpg_urkl
EXP_NAME=${EXP_NAME:-qwen3-4b-8k-rpg-urkl}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_verl "$@"
