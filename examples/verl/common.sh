# Shared settings of the paper's Qwen3-4B runs (docs/math.md §7) on verl 0.9 with an rpgrl loss.
# Sourced by run_*.sh after they set LOSS (a verl loss_mode registered by rpgrl) and EXP_NAME.
# Every setting can be overridden from the environment; extra arguments of run_*.sh are
# appended as hydra overrides (they win). PRINT_ONLY=1 prints the overrides, one per line,
# instead of launching (tests/test_integration_verl.py composes them with verl's config).

: "${LOSS:?set LOSS to the rpgrl loss to run, e.g. rpg_reinforce_ufkl}"
: "${EXP_NAME:?set EXP_NAME}"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Paths (local files: verl reads parquet in the verl format of docs/math.md §9)
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-4B}
DATA_DIR=${DATA_DIR:-$HOME/data/rpg}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/dapo-math-17k-eng.parquet}
VAL_FILES=${VAL_FILES:-"[$DATA_DIR/aime-2024.parquet,$DATA_DIR/aime25.parquet,$DATA_DIR/amc-23.parquet]"}
CKPTS_DIR=${CKPTS_DIR:-$PWD/ckpts/rpgrl-verl/$EXP_NAME}
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
ROLLOUT_TP=${ROLLOUT_TP:-1}

# The paper's recipe (docs/math.md §7)
BETA=${BETA:-1e-4}
LR=${LR:-1e-6}
TRAIN_STEPS=${TRAIN_STEPS:-400}
PROMPTS_PER_STEP=${PROMPTS_PER_STEP:-512}
RESPONSES_PER_PROMPT=${RESPONSES_PER_PROMPT:-16}
MINI_BATCH_PROMPTS=${MINI_BATCH_PROMPTS:-32}
MAX_PROMPT_LEN=${MAX_PROMPT_LEN:-2048}
MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN:-8192}
# Overlong shaping buffer: the reference scripts use max_response / 4 (512 for 2K).
OVERLONG_BUFFER_LEN=${OVERLONG_BUFFER_LEN:-$((MAX_RESPONSE_LEN / 4))}
MAX_TOKENS_PER_GPU=$((MAX_PROMPT_LEN + MAX_RESPONSE_LEN))

RPGRL_VERL_ARGS=(
    # --- the rpgrl loss (plugin: pip install -e ".[verl]" in the rpgrl clone) ---
    "actor_rollout_ref.actor.policy_loss._target_=rpgrl.integrations.verl.RPGPolicyLossConfig"
    "actor_rollout_ref.actor.policy_loss.loss_mode=$LOSS"
    "+actor_rollout_ref.actor.policy_loss.beta=$BETA"
    "+actor_rollout_ref.actor.policy_loss.anchor=rollout"
    "actor_rollout_ref.actor.clip_ratio_low=0.2"
    "actor_rollout_ref.actor.clip_ratio_high=0.28"
    "actor_rollout_ref.actor.clip_ratio_c=10.0"
    "actor_rollout_ref.actor.loss_agg_mode=token-mean"
    # RPG's KL lives in the loss: no verl KL term, no reference model (anchor = rollout)
    "actor_rollout_ref.actor.use_kl_loss=False"
    "algorithm.use_kl_in_reward=False"
    "actor_rollout_ref.actor.entropy_coeff=0"
    "algorithm.adv_estimator=rpg"
    # --- data ---
    "data.train_files=$TRAIN_FILE"
    "data.val_files=$VAL_FILES"
    "data.prompt_key=prompt"
    "data.truncation=left"
    "data.max_prompt_length=$MAX_PROMPT_LEN"
    "data.max_response_length=$MAX_RESPONSE_LEN"
    "data.train_batch_size=$PROMPTS_PER_STEP"
    # DAPO dynamic sampling: drop groups whose accuracy is all 0 or all 1
    "algorithm.filter_groups.enable=True"
    "algorithm.filter_groups.metric=acc"
    # --- rewards: rpgrl's scorer (Answer: line, \boxed{}, math-verify) + overlong shaping ---
    "reward.custom_reward_function.path=$HERE/reward_fn.py"
    "reward.custom_reward_function.name=compute_score"
    "reward.reward_manager.name=dapo"
    "+reward.reward_kwargs.max_resp_len=$MAX_RESPONSE_LEN"
    "+reward.reward_kwargs.overlong_buffer_cfg.enable=True"
    "+reward.reward_kwargs.overlong_buffer_cfg.len=$OVERLONG_BUFFER_LEN"
    "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0"
    "+reward.reward_kwargs.overlong_buffer_cfg.log=False"
    # --- model / optimizer: AdamW lr 1e-6, wd 0.1, 10 warm-up steps, grad-norm clip 1.0 ---
    "actor_rollout_ref.model.path=$MODEL_PATH"
    "actor_rollout_ref.model.use_remove_padding=True"
    "actor_rollout_ref.model.enable_gradient_checkpointing=True"
    "actor_rollout_ref.actor.optim.lr=$LR"
    "actor_rollout_ref.actor.optim.weight_decay=0.1"
    "actor_rollout_ref.actor.optim.lr_warmup_steps=10"
    "actor_rollout_ref.actor.optim.clip_grad=1.0"
    "actor_rollout_ref.actor.ppo_mini_batch_size=$MINI_BATCH_PROMPTS"
    "actor_rollout_ref.actor.ppo_epochs=1"
    "actor_rollout_ref.actor.use_dynamic_bsz=True"
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$MAX_TOKENS_PER_GPU"
    # --- rollout: vLLM, 16 responses per prompt, temperature 1.0, top_p 1.0 ---
    "actor_rollout_ref.rollout.name=vllm"
    "actor_rollout_ref.rollout.n=$RESPONSES_PER_PROMPT"
    "actor_rollout_ref.rollout.temperature=1.0"
    "actor_rollout_ref.rollout.top_p=1.0"
    "actor_rollout_ref.rollout.top_k=-1"
    "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP"
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.8"
    "actor_rollout_ref.rollout.max_num_batched_tokens=$MAX_TOKENS_PER_GPU"
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$MAX_TOKENS_PER_GPU"
    # --- evaluation: Mean@32 = the eval files repeat each problem 32 times, 1 sample each ---
    "actor_rollout_ref.rollout.val_kwargs.do_sample=True"
    "actor_rollout_ref.rollout.val_kwargs.temperature=1.0"
    "actor_rollout_ref.rollout.val_kwargs.top_p=1.0"
    "actor_rollout_ref.rollout.val_kwargs.n=1"
    # --- trainer ---
    "trainer.total_training_steps=$TRAIN_STEPS"
    "trainer.n_gpus_per_node=$NGPUS_PER_NODE"
    "trainer.nnodes=$NNODES"
    "trainer.val_before_train=True"
    "trainer.test_freq=10"
    "trainer.save_freq=50"
    "trainer.logger=[console,tensorboard]"
    "trainer.project_name=rpgrl-verl"
    "trainer.experiment_name=$EXP_NAME"
    "trainer.default_local_dir=$CKPTS_DIR"
    "trainer.resume_mode=auto"
)

run_verl() {
    if [[ "${PRINT_ONLY:-0}" == 1 ]]; then
        printf '%s\n' "${RPGRL_VERL_ARGS[@]}" "$@"
        return 0
    fi
    python3 -c "import rpgrl.integrations.verl" || {
        echo "rpgrl's verl plugin does not import (see the error above); pip install -e '.[verl]' in the rpgrl clone" >&2
        return 1
    }
    set -x
    python3 -m verl.trainer.main_ppo "${RPGRL_VERL_ARGS[@]}" "$@"
}
