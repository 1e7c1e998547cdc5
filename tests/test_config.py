"""Config: presets, YAML + dotted overrides, and named errors for bad values."""

from pathlib import Path

import pytest

from rpgrl.config import PRESETS, ConfigError, check_world_size, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_cpu_default():
    cfg = load_config()
    assert cfg.algorithm.preset == "rpg_reinforce_ufkl"
    assert cfg.algorithm.loss == "rpg_reinforce_ufkl"
    assert cfg.algorithm.anchor.mode == "rollout"
    assert cfg.model.path is None


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["algorithm.beta=1e-3", "trainer.total_steps=7", "output_dir=x",
                                 "data.train_files=[a.parquet,b.parquet]", "model.path=foo",
                                 "algorithm.dual_clip=null"])
    assert cfg.algorithm.beta == 1e-3 and isinstance(cfg.algorithm.beta, float)
    assert cfg.trainer.total_steps == 7
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.algorithm.dual_clip is None


def test_preset_then_yaml_then_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("algorithm:\n  preset: grpo\n  clip_high: 0.3\n")
    cfg = load_config(y, ["algorithm.beta=0.5"])
    assert cfg.algorithm.loss == "grpo" and cfg.algorithm.advantage == "grpo"
    assert cfg.algorithm.clip_low == 0.2 and cfg.algorithm.clip_high == 0.3  # yaml beats preset
    assert cfg.algorithm.beta == 0.5  # override beats both
    assert cfg.algorithm.anchor.mode == "fixed"


def test_yaml_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 5\ntrainer:\n  total_steps: 9\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\ntrainer:\n  total_steps: 3\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.seed == 5 and cfg.trainer.total_steps == 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = load_config(overrides=[f"algorithm.preset={name}"])
    assert cfg.algorithm.preset == name


#: base.yaml files are merged under the per-algorithm files, so only the latter are runnable configs;
#: *-plan.yaml files are study plans (rpgrl.tools.study_plan), checked in tests/test_study.py
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                 if p.name != "base.yaml" and not p.name.endswith("-plan.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    if path.parent.parent.name == "paper":  # paper configs: the preset named by the file is applied
        assert cfg.algorithm.preset == path.stem
        check_world_size(cfg, 8)  # the paper's 8-GPU runs, dynamic sampling included
    if path.stem.startswith("rpg_"):  # the paper trains RPG with DAPO's dynamic sampling and
        # overlong shaping (its run scripts: enable_filter_groups, enable_overlong_buffer)
        ds, ov = cfg.algorithm.dynamic_sampling, cfg.algorithm.overlong
        assert ds.enabled and ds.max_gen_batches == 4
        assert ov.enabled and 0 < ov.buffer_len < cfg.rollout.max_new_tokens


BAD = [
    (["algorithm.dual_clip=1.0"], "algorithm.dual_clip: dual_clip must be > 1 (or None to disable), got 1.0"),
    (["algorithm.beta=-0.1"], "algorithm.beta: beta must be a finite number >= 0, got -0.1"),
    (["trainer.prompts_per_step=10", "trainer.mini_batch_prompts=4"],
     "trainer.mini_batch_prompts: 4 must divide trainer.prompts_per_step (10)"),
    (["trainer.micro_batch_sequences=48"],
     "trainer.micro_batch_sequences: 48 must divide the sequences per mini-batch, "
     "trainer.mini_batch_prompts * rollout.n = 64"),
    (["algorithm.betta=1"], "unknown config key 'algorithm.betta'. Did you mean algorithm.beta?"),
    (["trainer.total_steps=abc"], "trainer.total_steps: expected an integer, got 'abc'"),
    (["algorithm.preset=ppo2"], "algorithm.preset: unknown preset 'ppo2'; allowed:"),
    (["algorithm.loss=foo"], "algorithm.loss: 'foo' is not one of"),
    (["algorithm.agg=mean"], "algorithm.agg: 'mean' is not one of token-mean, seq-mean-token-sum, seq-mean-token-mean"),
    (["algorithm.anchor.mode=sometimes"], "algorithm.anchor.mode: 'sometimes' is not one of rollout, periodic, adaptive, fixed"),
    (["rollout.temperature=0"], "rollout.temperature: 0.0 must be > 0"),
    (["optim.name=sgd"], "optim.name: 'sgd' is not one of adamw, schedulefree_adamw"),
    (["eval.k=4"], "eval.k: k > 1 samples per problem needs eval.temperature > 0"),
    (["trainer"], "override 'trainer' must look like dotted.key=value"),
    (["trainer=3"], "trainer: expected a mapping of sub-keys, got 3"),
    (["model.lora.enabled=maybe"], "model.lora.enabled: expected true or false, got 'maybe'"),
    (["data.train_files=[x.parquet]"], "model.path: the built-in tiny model only knows the procedural task"),
    (["algorithm.kl_in_reward=0.01"],
     "algorithm.kl_in_reward: a KL folded into the reward needs a reference; with algorithm.anchor.mode=rollout"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_config_names_key_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1,2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_demo_yaml_is_the_default():
    """configs/demo.yaml documents the CPU default; it must not drift from the code."""
    assert load_config(REPO / "configs" / "demo.yaml") == load_config(overrides=["output_dir=runs/demo"])


@pytest.mark.parametrize("old,new,value", [
    ("trainer.mini_batch_size", "mini_batch_prompts", 16),
    ("trainer.micro_batch_size", "micro_batch_sequences", 16),
    ("algorithm.clip_c", "dual_clip", 3.0),
])
def test_deprecated_names_still_work_and_warn(old, new, value):
    """Renamed keys (names carry their unit) keep their old spelling, with a FutureWarning."""
    with pytest.warns(FutureWarning, match=f"{old} is deprecated"):
        cfg = load_config(overrides=[f"{old}={value}"])
    section = cfg.trainer if old.startswith("trainer") else cfg.algorithm
    assert getattr(section, new) == value and getattr(section, old.split(".")[1]) == value
    with pytest.raises(ConfigError, match="same key"):
        load_config(overrides=[f"{old}={value}", f"{old.split('.')[0]}.{new}={value}"])


def test_help_config_lists_every_key_with_a_description(capsys):
    import dataclasses

    from rpgrl.cli import main
    from rpgrl.config import Config, describe

    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            yield from leaves(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]

    keys = list(leaves(Config()))
    rows = describe()
    assert [r[0] for r in rows] == keys and len(keys) > 80
    assert all(r[3].strip() for r in rows), [r[0] for r in rows if not r[3].strip()]
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key, typ, default, doc in rows:
        assert any(line.split()[:2] == [key, typ.split()[0]] and line.rstrip().find(doc) > 0
                   for line in out.splitlines()), key


def test_world_size_checks_name_the_key():
    from rpgrl.parallel.distributed import DistContext

    cfg = load_config(overrides=["trainer.prompts_per_step=6", "trainer.mini_batch_prompts=3",
                                 "algorithm.dynamic_sampling.enabled=false", "trainer.micro_batch_sequences=8"])
    check_world_size(cfg, 1)
    check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match=r"trainer.prompts_per_step: 6 is not divisible by the world size 4"):
        check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"trainer.mini_batch_prompts: 3 is not divisible by the world size 2"):
        check_world_size(cfg, 2)
    dapo = load_config(overrides=["algorithm.preset=dapo", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2",
                                  "trainer.micro_batch_sequences=8"])
    check_world_size(dapo, 2)  # dynamic sampling runs under torchrun
    assert DistContext(rank=1, world_size=2).shard([10, 11, 12, 13]) == [12, 13]


@pytest.mark.parametrize("old, new, value", [
    ("algorithm.name", "algorithm.preset", "grpo"),
    ("algorithm.anchor.period", "algorithm.anchor.period_optimizer_steps", 7),
    ("rollout.batch_size", "rollout.generate_batch_sequences", 32),
    ("optim.warmup_steps", "optim.warmup_optimizer_steps", 5),
])
def test_renamed_keys_keep_working_with_a_warning(tmp_path, old, new, value):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated; use {new}"):
        cfg = load_config(overrides=[f"{old}={value}"])
    obj = cfg
    for part in new.split("."):
        obj = getattr(obj, part)
    assert obj == value
    if old == "algorithm.name":  # the preset really applied, also spelled the old way in YAML
        y = tmp_path / "c.yaml"
        y.write_text("algorithm:\n  name: grpo\n")
        with pytest.warns(FutureWarning):
            assert load_config(y).algorithm.loss == "grpo"
    with pytest.raises(ConfigError, match="same key"):
        load_config(overrides=[f"{old}={value}", f"{new}={value}"])


@pytest.mark.parametrize("key", ["trainer.num_threads", "eval.max_problems", "eval.max_new_tokens"])
def test_zero_for_default_is_null_now(key):
    assert _dotted(load_config(), key) is None
    with pytest.warns(FutureWarning, match=f"{key}=0 is deprecated; use null"):
        assert _dotted(load_config(overrides=[f"{key}=0"]), key) is None
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[f"{key}=-1"])


def _dotted(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
