"""rollout.top_p < 1 is refused where the loss's importance weights assume pi_old sampled.

rpgrl's sampler truncates to the top-p nucleus while pi_old (and so w = pi_theta/pi_old and
v = pi_anc/pi_old) is the full softmax; on-policy (one optimizer step per batch, rollout
anchor) w = 1 exactly and the combination is allowed.
"""

from __future__ import annotations

import pytest

from rpgrl.config import ConfigError, load_config

ON_POLICY = ["trainer.prompts_per_step=8", "trainer.mini_batch_prompts=8", "trainer.micro_batch_sequences=8",
             "trainer.epochs=1",
             "algorithm.anchor.mode=rollout", "optim.name=adamw"]


def test_on_policy_top_p_is_allowed():
    cfg = load_config(overrides=ON_POLICY + ["rollout.top_p=0.9"])
    assert cfg.rollout.top_p == 0.9
    # a separate anchor without a KL term has no ratio either
    assert load_config(overrides=ON_POLICY + ["rollout.top_p=0.9", "algorithm.anchor.mode=fixed",
                                              "algorithm.beta=0"]).rollout.top_p == 0.9


@pytest.mark.parametrize("extra, reason", [
    (["trainer.epochs=2"], "trainer.epochs=2"),
    (["trainer.mini_batch_prompts=4"], "2 mini-batches per batch"),
    (["optim.name=schedulefree_adamw"], "schedulefree_adamw"),
    (["algorithm.anchor.mode=periodic"], "algorithm.anchor.mode=periodic with beta > 0"),
])
def test_off_policy_top_p_is_refused_with_why_and_what_to_do(extra, reason):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=ON_POLICY + ["rollout.top_p=0.9"] + extra)
    msg = str(info.value)
    assert msg.startswith("rollout.top_p: 0.9 < 1") and reason in msg
    assert "Set rollout.top_p=1.0" in msg and "trainer.mini_batch_prompts=trainer.prompts_per_step" in msg
    # the same off-policy setup is fine with the full softmax
    assert load_config(overrides=ON_POLICY + ["rollout.top_p=1.0"] + extra).rollout.top_p == 1.0


def test_default_config_with_top_p_is_refused():
    """The defaults take 4 optimizer steps per batch (32 prompts / 8 per mini-batch)."""
    with pytest.raises(ConfigError, match="4 mini-batches per batch"):
        load_config(overrides=["rollout.top_p=0.95"])
