"""The iterative reference (docs/math.md §1.1: fixed / periodic / adaptive KL anchors) in verl 0.9.1.

``python -m rpgrl.integrations.verl_anchor <the overrides of verl.trainer.main_ppo>`` is verl's
``main_ppo`` run through verl's own recipe hook ``run_ppo(config, task_runner_class)``
(verl/trainer/main_ppo.py:34), with one change: the actor worker is
:class:`RPGActorRolloutRefWorker`, a subclass of verl's ``ActorRolloutRefWorker``
(verl/workers/engine_workers.py:452). No verl file is edited. The worker

* wraps verl's ``ppo_loss`` (engine_workers.py:643) so that the micro-batch's ``ref_log_prob``,
  which ``ppo_loss`` selects but never passes to a policy loss (verl/workers/utils/losses.py:89-112),
  becomes the rpgrl loss's anchor (:func:`rpgrl.integrations.verl.anchor_log_prob`);
* keeps rpgrl's refresh schedule (:class:`rpgrl.algorithm.anchor.Anchor`: K counts optimizer steps, kappa
  bounds a moving average of the token k3 KL to the anchor), observing every optimizer step of
  ``update_actor`` on every rank with rank 0's values (:func:`rank0_values`: under Ulysses
  sequence parallelism verl returns the metrics on sequence-parallel rank 0 only);
* when a refresh is due, copies the actor's weights into its reference engine at the next
  batch boundary, right before ``compute_ref_log_prob``: each rank its own shards, no
  collective, both models resharded first (:func:`rpgrl.parallel.shards.copy_shards`; FSDP1 and
  FSDP2); :func:`check_refresh_layout` refuses at ``init_model`` a pair it could not make equal;
* saves the anchor (schedule and reference shards) into verl's actor checkpoint and restores
  it on resume (:func:`save_anchor_state`, :func:`load_anchor_state`).

The reference model is verl's own (loaded from ``model.path``, so the fixed anchor is the
initial policy). verl builds it and computes ``ref_log_prob`` only when
``need_reference_policy`` is true (verl/trainer/ppo/utils.py:75-79), so :func:`prepare_config`
sets ``actor.use_kl_loss=true`` with ``kl_loss_coef=0`` (verl's KL term then adds 0 and logs
``actor/kl_loss``, verl's estimate of the KL to the anchor).

Both verl trainers: the legacy one (``trainer.use_v1=false``, its ``TaskRunner`` with the
worker swapped) and v1 (``TaskRunnerV1``; the registered trainer class of
``trainer.v1.trainer_mode`` is subclassed to swap the worker, in the task runner's process only).

What rpgrl's own trainer does and this does not: a refresh due after an optimizer step that
is not the batch's last is taken at the next batch boundary (verl computes ``ref_log_prob``
once per batch before the update: verl/trainer/ppo/ray_trainer.py:1618-1622,
verl/trainer/ppo/v1/trainer_base.py:588-591); periodic / adaptive need the reference in the
actor's own worker (verl's hybrid ``actor_rollout_ref`` role, not a separate ``ref`` worker);
FSDP1 / FSDP2 engines only (docs/verl.md has the table of what is tested and what is refused).

verl internals are used (worker and task-runner classes, ``engine.module``), so this module
refuses verl versions other than :data:`VERL_TESTED`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

import verl

#: verl versions this module was run with (it subclasses verl internals).
VERL_TESTED = ("0.9.1",)
if verl.__version__ not in VERL_TESTED:  # pragma: no cover - exercised only with another verl
    raise ImportError(
        f"rpgrl.integrations.verl_anchor subclasses verl {', '.join(VERL_TESTED)} internals "
        f"(ActorRolloutRefWorker, TaskRunner, the FSDP engine), found verl {verl.__version__}; "
        f"pip install 'verl==0.9.1', or use anchor=rollout with python -m verl.trainer.main_ppo"
    )

import ray  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402

from rpgrl.algorithm.anchor import Anchor  # noqa: E402
from rpgrl.integrations import verl as rv  # noqa: E402
from rpgrl.algorithm.kl import k3_from_log_ratio  # noqa: E402
from rpgrl.parallel.shards import copy_shards, fsdp_version, layout_mismatch, load_shards, local_shards, shard_layout  # noqa: E402

__all__ = [
    "VERL_TESTED",
    "AnchoredLoss",
    "RPGActorRolloutRefWorker",
    "anchor_kl_k3",
    "anchor_settings",
    "check_refresh_layout",
    "load_anchor_state",
    "main",
    "prepare_config",
    "rank0_values",
    "save_anchor_state",
]

#: Metric keys the worker adds to ``update_actor``'s output (logged by verl as is).
REFRESHES = "actor/rpg/anchor_refreshes"
STEPS_SINCE_REFRESH = "actor/rpg/anchor_steps_since_refresh"
KL_OLD_ANCHOR = "actor/rpg/anchor_kl_old_k3"
#: max |old_log_prob - ref_log_prob| of the batch ("max" in the name: verl's reducer takes the max)
OLD_ANCHOR_GAP = "actor/rpg/anchor_logprob_gap_max"
#: The moving average of the KL to the anchor that the adaptive rule compares with kappa.
KL_EMA = "actor/rpg/anchor_kl_ema"
#: The loss metric the schedule observes (rpgrl's own trainer observes the same k3 KL).
KL_ANCHOR = "actor/rpg/kl_anchor_k3"
WHERE = "actor_rollout_ref.actor.policy_loss"
ACTOR_FSDP, REF_FSDP = "actor_rollout_ref.actor.fsdp_config", "actor_rollout_ref.ref.fsdp_config"
#: Folder inside verl's actor checkpoint (``global_step_N/actor/``) that holds the anchor.
ANCHOR_STATE_DIR = "rpgrl_anchor"


def anchor_settings(policy_loss: Any) -> tuple[str, int, float, float]:
    """(anchor, anchor_period, anchor_kappa, anchor_ema) of ``actor.policy_loss``, checked."""
    get = policy_loss.get if hasattr(policy_loss, "get") else (lambda k, d=None: getattr(policy_loss, k, d))
    values = (get("anchor", "rollout") or "rollout", get("anchor_period", 20), get("anchor_kappa", 0.05),
              get("anchor_ema", 0.9))
    rv._check_rpg_options(get("beta", rv.DEFAULT_BETA), values[0], WHERE, *values[1:])
    return values[0], int(values[1]), float(values[2]), float(values[3])


def prepare_config(config: DictConfig) -> str:
    """Check the anchor settings; for a non-rollout anchor make verl load the reference model
    and compute ``ref_log_prob`` (``use_kl_loss=true, kl_loss_coef=0`` unless verl already
    needs a reference). Returns the anchor mode."""
    actor = config.actor_rollout_ref.actor
    mode, *_ = anchor_settings(actor.policy_loss)
    if mode == "rollout":
        return mode
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    if loss_mode not in rv.VERL_LOSS_NAMES:
        raise ValueError(f"{WHERE}.anchor={mode!r} is an rpgrl option: set {WHERE}.loss_mode to an rpgrl loss "
                         f"({', '.join(rv.VERL_LOSS_NAMES)}), got {loss_mode!r}")
    lora = config.actor_rollout_ref.model.get("lora", {}).get("rank", 0) or config.actor_rollout_ref.model.get("lora_rank", 0)
    if lora and lora > 0:
        raise ValueError(f"{WHERE}.anchor={mode!r}: with LoRA verl's reference is the base model inside the actor "
                         f"(no separate reference to refresh); use anchor=rollout")
    if not (actor.use_kl_loss or config.algorithm.get("use_kl_in_reward", False)):
        with open_dict(config):
            actor.use_kl_loss = True
            actor.kl_loss_coef = 0.0
        print(f"rpgrl: {WHERE}.anchor={mode}: loading verl's reference model "
              f"(actor.use_kl_loss=true with kl_loss_coef=0, so verl's own KL term adds 0)")
    return mode


class AnchoredLoss:
    """verl's loss function (``partial(ppo_loss, config=...)``) with the micro-batch's
    ``ref_log_prob`` as the rpgrl loss's anchor; picklable, same call signature."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model_output: Any, data: Any, dp_group: Any = None) -> Any:
        if "ref_log_prob" not in data.keys():
            raise ValueError(
                f"{WHERE}.anchor needs ref_log_prob in the actor's batch; verl computes it only when "
                f"actor.use_kl_loss or algorithm.use_kl_in_reward is true (rpgrl.integrations.verl_anchor "
                f"sets use_kl_loss=true, kl_loss_coef=0 itself)"
            )
        # the same padded layout as ppo_loss's old_log_probs (losses.py:86-91)
        ref = data.select("response_mask", "ref_log_prob").to_padded_tensor()["ref_log_prob"]
        with rv.anchor_log_prob(ref):
            return self.loss_fn(model_output=model_output, data=data, dp_group=dp_group)


def check_refresh_layout(actor: torch.nn.Module, reference: torch.nn.Module, *,
                         actor_compute: Optional[torch.dtype] = None,
                         reference_compute: Optional[torch.dtype] = None) -> None:
    """Refuse, at ``init_model``, an actor / reference pair that a refresh could not make equal:
    different FSDP versions, different shards on this rank (fsdp_size, wrap policy,
    use_orig_params padding, parameter dtype), or different compute dtypes (mixed precision).
    Each message names the verl key to change."""
    a, r = fsdp_version(actor), fsdp_version(reference)
    kinds = {0: "not FSDP-wrapped", 1: "FSDP1 (strategy=fsdp)", 2: "FSDP2 (strategy=fsdp2)"}
    if a != r:
        raise ValueError(f"{WHERE}.anchor: the actor is {kinds[a]} and the reference {kinds[r]}, so the refresh "
                         f"cannot copy shard by shard; set {REF_FSDP}.strategy={'fsdp2' if a == 2 else 'fsdp'} "
                         f"(the actor's {ACTOR_FSDP}.strategy)")
    problem = layout_mismatch(shard_layout(actor), shard_layout(reference))
    if problem is not None:
        raise ValueError(f"{WHERE}.anchor: the reference is sharded differently from the actor ({problem}); set "
                         f"{REF_FSDP}.fsdp_size, wrap_policy, use_orig_params and model_dtype to the actor's "
                         f"({ACTOR_FSDP}.*)")
    if actor_compute != reference_compute:
        name = str(actor_compute).replace("torch.", "")
        raise ValueError(f"{WHERE}.anchor: the actor computes in {name} and the reference in "
                         f"{str(reference_compute).replace('torch.', '')}, so a refreshed reference would not "
                         f"reproduce the actor's log-probs; set {REF_FSDP}.mixed_precision.param_dtype={name} "
                         f"(the actor's {ACTOR_FSDP}.mixed_precision.param_dtype)")


def save_anchor_state(path: str | os.PathLike, anchor: Anchor, reference: Optional[torch.nn.Module]) -> Path:
    """Write the anchor into verl's actor checkpoint folder ``path``: the schedule (rank 0,
    ``schedule.json``) and, when given, each rank's shards of the reference
    (``reference_rank{r}_of_{world}.pt``), so that a resumed run has the same reference and
    schedule as the uninterrupted one. Returns the folder."""
    rank, world = _rank_world()
    folder = Path(path) / ANCHOR_STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if reference is not None:
        shards = {n: t.detach().cpu().clone() for n, t in local_shards(reference).items()}
        torch.save(shards, folder / f"reference_rank{rank}_of_{world}.pt")
    if rank == 0:
        state = {k: v for k, v in anchor.state_dict().items() if k != "weights"}
        state.update(mode=anchor.mode, period=anchor.period, kappa=anchor.kappa, ema=anchor.ema,
                     world_size=world, reference_saved=reference is not None)
        (folder / "schedule.json").write_text(json.dumps(state, indent=1) + "\n")
    if world > 1:
        torch.distributed.barrier()
    return folder


def load_anchor_state(path: str | os.PathLike, anchor: Anchor, reference: Optional[torch.nn.Module]) -> bool:
    """Restore what :func:`save_anchor_state` wrote under ``path``; False (with a warning that
    says what the reference will be) when the checkpoint has no anchor state, e.g. one written
    by a plain verl run."""
    rank, world = _rank_world()
    folder = Path(path) / ANCHOR_STATE_DIR
    if not (folder / "schedule.json").exists():
        what = ("the initial model (actor_rollout_ref.model.path), as it is for a fixed anchor anyway"
                if anchor.mode == "fixed" else
                "the initial model (actor_rollout_ref.model.path), not the policy the interrupted run last "
                "refreshed it to, until its next refresh")
        if rank == 0:
            warnings.warn(f"rpgrl: {path} holds no anchor state ({ANCHOR_STATE_DIR}/): the {anchor.mode} anchor's "
                          f"reference is {what}, and its schedule restarts at step 0", stacklevel=2)
        return False
    saved = json.loads((folder / "schedule.json").read_text())
    if saved["world_size"] != world:
        raise ValueError(f"{folder}: the anchor was saved by {saved['world_size']} ranks, this run has {world}; "
                         f"resume with {saved['world_size']} ranks (the reference is saved shard by shard), or "
                         f"remove {folder} to restart the reference from the initial model")
    changed = [f"{k} {saved[k]} -> {getattr(anchor, k)}" for k in ("mode", "period", "kappa", "ema")
               if saved[k] != getattr(anchor, k)]
    if changed and rank == 0:
        print(f"rpgrl: resuming the anchor of {folder} under new settings ({', '.join(changed)})")
    anchor.load_state_dict({**saved, "weights": {}})
    if reference is not None and saved["reference_saved"]:
        file = folder / f"reference_rank{rank}_of_{world}.pt"
        if not file.exists():
            raise ValueError(f"{file} is missing: every rank's shard of the reference is needed to resume")
        load_shards(reference, torch.load(file, map_location="cpu", weights_only=True), source=str(file))
    return True


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank0_values(values: Optional[list[float]]) -> list[float]:
    """Global rank 0's ``values`` on every rank. verl returns ``update_actor``'s metrics only on
    ranks whose Ulysses sequence-parallel rank is 0 (engine_workers.py:313-327, ``None`` elsewhere),
    so the schedule is driven by rank 0's per-step KLs everywhere: all ranks refresh together."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return list(values or [])
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise RuntimeError("rpgrl: global rank 0 returned no actor metrics, so the anchor schedule has no KL "
                           "to observe (verl returns them on Ulysses sequence-parallel rank 0)")
    return list(box[0])


def anchor_kl_k3(old_log_prob: Tensor, ref_log_prob: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """(sum, count, max |log pi_old - log pi_anc|) over valid tokens of the k3 estimate of
    KL(pi_old || pi_anc) at the batch start, samples from pi_old: both are exactly 0 right after
    a refresh (anchor = pi_old), when the reference reproduces the actor's log-probs."""
    valid = mask.bool()
    log_ratio = torch.where(valid, old_log_prob.double() - ref_log_prob.double(), 0.0)  # log pi_old / pi_anc
    return (float(k3_from_log_ratio(log_ratio).sum()), float(valid.sum()),
            float(log_ratio.abs().max()) if log_ratio.numel() else 0.0)


def _optimizer_step_kls(metrics: dict) -> list[float]:
    """The per-optimizer-step k3 KL to the anchor from ``train_mini_batch``'s metrics
    (one entry per mini-batch, already averaged over dp ranks: engine_workers.py:322-336)."""
    values = metrics.get(KL_ANCHOR)
    if values is None:
        raise ValueError(f"{KL_ANCHOR} missing from the actor's metrics: is {WHERE}.loss_mode an rpgrl loss?")
    values = values if isinstance(values, list) else [values]
    return [float(v.aggregate() if hasattr(v, "aggregate") else v) for v in values]


class RPGActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor / rollout / reference worker with rpgrl's anchor (module docstring)."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        mode, period, kappa, ema = anchor_settings(self.config.actor.policy_loss)
        self._rpg_anchor: Optional[Anchor] = None
        if mode == "rollout" or self.actor is None:
            return
        self.loss_fn = AnchoredLoss(self.loss_fn)
        self.actor.set_loss_fn(self.loss_fn)
        # The snapshot itself is verl's reference engine; Anchor keeps only the schedule
        # (fixed: never due, so verl's reference stays the initial policy).
        self._rpg_anchor = Anchor(mode=mode, period=period, kappa=kappa, ema=ema, model=torch.nn.Module())
        if mode == "fixed":
            return
        if self.ref is None:
            raise ValueError(
                f"{WHERE}.anchor={mode!r} refreshes the reference from the actor, so both must live in one "
                f"worker (verl's actor_rollout_ref role); this worker's role is {self.role!r}"
            )
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

        for engine in (self.actor.engine, self.ref.engine):
            if not isinstance(engine, FSDPEngine):
                raise ValueError(f"{WHERE}.anchor={mode!r}: refreshing the reference supports verl's FSDP1 / FSDP2 "
                                 f"engines (strategy=fsdp / fsdp2) only, got {type(engine).__name__}")
        check_refresh_layout(self.actor.engine.module, self.ref.engine.module,
                             actor_compute=getattr(self.actor.engine, "_autocast_dtype", None),
                             reference_compute=getattr(self.ref.engine, "_autocast_dtype", None))

    def _anchor_reference(self) -> Optional[torch.nn.Module]:
        """The reference engine's module when the anchor refreshes it (periodic / adaptive)."""
        anchor = getattr(self, "_rpg_anchor", None)
        if anchor is None or anchor.mode == "fixed" or self.ref is None:
            return None
        return self.ref.engine.module

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="ref"))
    def compute_ref_log_prob(self, data):
        anchor = getattr(self, "_rpg_anchor", None)
        if anchor is not None and anchor.due:  # a batch boundary: the actor holds pi_old of this batch
            copy_shards(self.actor.engine.module, self.ref.engine.module)
            anchor.maybe_refresh(torch.nn.Module())
        return super().compute_ref_log_prob(data)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        kl_old = None
        if "ref_log_prob" in data.keys() and "old_log_probs" in data.keys():
            padded = data.select("response_mask", "old_log_probs", "ref_log_prob").to_padded_tensor()
            kl_old = anchor_kl_k3(padded["old_log_probs"], padded["ref_log_prob"], padded["response_mask"])
            group = self.actor.engine.get_data_parallel_group()
            if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
                sums, gap = torch.tensor(kl_old[:2], dtype=torch.float64), torch.tensor([kl_old[2]], dtype=torch.float64)
                torch.distributed.all_reduce(sums, group=group)
                torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX, group=group)
                kl_old = (*sums.tolist(), gap.item())
        output = super().update_actor(data)
        metrics = None if output is None else tu.get(output, "metrics")
        anchor = getattr(self, "_rpg_anchor", None)
        if anchor is not None:
            # every rank observes rank 0's KLs, also those verl gave no output (Ulysses SP)
            for kl in rank0_values(None if metrics is None else _optimizer_step_kls(metrics)):
                anchor.observe(kl if math.isfinite(kl) else float("inf"))
        if output is None:
            return output
        if anchor is not None:
            metrics[REFRESHES] = [float(anchor.refreshes)]
            metrics[STEPS_SINCE_REFRESH] = [float(anchor.steps_since_refresh)]
            if anchor.kl_ema is not None:
                metrics[KL_EMA] = [float(anchor.kl_ema)]
        if kl_old is not None:
            metrics[KL_OLD_ANCHOR] = [kl_old[0] / max(kl_old[1], 1.0)]
            metrics[OLD_ANCHOR_GAP] = [kl_old[2]]
        tu.assign_non_tensor(output, metrics=metrics)
        return output

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        anchor = getattr(self, "_rpg_anchor", None)
        if anchor is not None:
            save_anchor_state(local_path, anchor, self._anchor_reference())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        anchor = getattr(self, "_rpg_anchor", None)
        if anchor is not None:  # first: verl may delete local_path once it has loaded the actor
            load_anchor_state(local_path, anchor, self._anchor_reference())
        super().load_checkpoint(local_path, hdfs_path, del_local_after_load)


def _original_class(actor_class: Any) -> type:
    """The Python class behind a ``@ray.remote`` class (Ray 2.x keeps it there)."""
    return actor_class.__ray_metadata__.modified_class.__ray_actor_class__


def swap_actor_worker(role_worker_mapping: dict) -> int:
    """Replace verl's ``ActorRolloutRefWorker`` by :class:`RPGActorRolloutRefWorker` in a
    role -> remote-class mapping; returns how many roles were swapped."""
    swapped = 0
    for role, remote_cls in list(role_worker_mapping.items()):
        if _original_class(remote_cls) is ActorRolloutRefWorker:
            role_worker_mapping[role] = ray.remote(RPGActorRolloutRefWorker)
            swapped += 1
    return swapped


from verl.trainer.main_ppo import TaskRunnerV1 as _TaskRunnerV1  # noqa: E402
from verl.trainer.main_ppo_v0 import BaseTaskRunner  # noqa: E402
from verl.trainer.main_ppo_v0 import TaskRunner as _TaskRunner  # noqa: E402


class _AnchoredTaskRunner(_original_class(_TaskRunner)):
    """verl's legacy ``TaskRunner`` (main_ppo_v0.py:136) with the anchored actor worker."""

    def __init__(self):
        # not TaskRunner.__init__: Ray ships the actor class by value with a copy of it whose
        # zero-argument super() names a copy of TaskRunner, not this class's base
        BaseTaskRunner.__init__(self)

    def add_actor_rollout_worker(self, config):
        _, group_cls = super().add_actor_rollout_worker(config)
        if swap_actor_worker(self.role_worker_mapping) != 1:
            raise RuntimeError(f"expected one ActorRolloutRefWorker role, got {self.role_worker_mapping}")
        return RPGActorRolloutRefWorker, group_cls


class _AnchoredTrainerMixin:
    """Swaps the actor worker right after verl's v1 trainer fills its role mapping
    (trainer_base.py:788-808, called from ``_setup``)."""

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not swap_actor_worker(self.role_worker_mapping):
            raise ValueError(
                f"{WHERE}.anchor needs verl's ActorRolloutRefWorker as the actor worker, but "
                f"trainer.v1.trainer_mode={self.config.trainer.v1.trainer_mode!r} uses "
                f"{sorted(_original_class(c).__name__ for c in self.role_worker_mapping.values())} "
                f"(separate_async swaps in DetachActorWorker); use trainer_mode sync or colocate_async, or anchor=rollout"
            )


class _AnchoredTaskRunnerV1(_original_class(_TaskRunnerV1)):
    """verl's ``TaskRunnerV1`` (main_ppo.py:102); the trainer registered for
    ``trainer.v1.trainer_mode`` is subclassed with :class:`_AnchoredTrainerMixin` for the
    duration of ``run``, in this task runner's process only."""

    def run(self, config):
        from verl.trainer.ppo.v1 import trainer_base

        mode = config.trainer.v1.trainer_mode
        base = trainer_base.get_trainer_cls(mode)
        trainer_base.TRAINER_REGISTRY[mode] = type(f"RPGAnchored{base.__name__}", (_AnchoredTrainerMixin, base), {})
        try:
            return super().run(config)
        finally:
            trainer_base.TRAINER_REGISTRY[mode] = base


AnchoredTaskRunner = ray.remote(_AnchoredTaskRunner)
AnchoredTaskRunnerV1 = ray.remote(_AnchoredTaskRunnerV1)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m rpgrl.integrations.verl_anchor``: verl's ``main_ppo`` (main_ppo.py:170-193)
    with :func:`prepare_config` and the anchored task runners."""
    import hydra

    @hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)
    def _main(config: DictConfig) -> None:
        from verl.trainer.main_ppo import run_ppo
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import validate_config
        from verl.utils.device import auto_set_device

        auto_set_device(config)
        prepare_config(config)
        validate_config(config=config, use_reference_policy=need_reference_policy(config),
                        use_critic=need_critic(config))
        run_ppo(config, task_runner_class=AnchoredTaskRunnerV1 if config.trainer.use_v1 else AnchoredTaskRunner)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    _main()


if __name__ == "__main__":
    # run the imported module's main, so that Ray pickles its classes by reference, not __main__'s
    from rpgrl.integrations import verl_anchor as _module

    _module.main()
