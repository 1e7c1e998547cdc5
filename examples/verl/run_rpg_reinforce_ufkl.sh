#!/usr/bin/env bash
# RPG-REINFORCE-UFKL (REINFORCE surrogate, Table 2; RPG-Style Clip, Algorithm 2) on Qwen3-4B, DAPO-Math-17k, 8K responses:
# the paper's run (docs/math.md §7-8) on verl 0.9 with rpgrl's loss. Needs 8 GPUs.
# Usage: bash examples/verl/run_rpg_reinforce_ufkl.sh [extra hydra overrides]
set -euo pipefail
LOSS=rpg_reinforce_ufkl
EXP_NAME=${EXP_NAME:-qwen3-4b-8k-rpg-reinforce-ufkl}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_verl "$@"
