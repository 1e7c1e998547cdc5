"""``rollout.name=rpgrl_hf``: a small Hugging Face ``generate`` rollout for verl 0.9 on CPU.

verl 0.9.1 has no CPU-capable rollout: its registries hold vllm / sglang / trtllm only
(verl/workers/rollout/base.py:84-88, replica.py:388-390) and the synchronous in-worker mode
is gone (ray_trainer.py:922). verl's async rollout is two pieces, both looked up by name:

* a :class:`RolloutReplica` (``RolloutReplicaRegistry``) that launches one server actor per
  replica; verl's agent loop calls ``server.generate(request_id, prompt_ids=,
  sampling_params=)`` and expects a :class:`TokenOutput` (token ids + their log-probs);
* a ``ServerAdapter`` (:class:`BaseRollout`, ``_ROLLOUT_REGISTRY[(name, "async")]``) that
  lives in the hybrid actor worker and receives the FSDP-exported weights in
  ``update_weights`` after every training step.

Here the server is a Ray actor holding an ``AutoModelForCausalLM`` that samples one request
at a time with ``generate`` and returns the log-probs of the sampled tokens under the
temperature-scaled distribution (vLLM's ``processed_logprobs``); the adapter streams the new
weights to it. Meant for tiny models and tests, not for speed.
"""

from __future__ import annotations

import os
from typing import Any, Generator, Optional

import ray
import torch
from torch import Tensor

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput


def server_name(replica_rank: int, suffix: str = "") -> str:
    """Ray actor name of replica ``replica_rank``'s server (the adapter finds it by name)."""
    return f"rpgrl_hf_rollout_{replica_rank}{suffix}"


def _model_path(model_config: Any) -> str:
    get = model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(model_config, k, d)
    path = get("local_path", None) or get("path", None)
    if not path:
        raise ValueError("rpgrl_hf rollout: actor_rollout_ref.model.path is not set")
    return os.path.expanduser(str(path))


def _torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if str(name) not in dtypes:
        raise ValueError(f"rpgrl_hf rollout: actor_rollout_ref.rollout.dtype={name!r}; expected one of {sorted(dtypes)}")
    return dtypes[str(name)]


class HFRolloutServer:
    """One replica's generation server (a Ray actor): HF ``generate``, one request at a time."""

    def __init__(self, model_path: str, response_length: int, seed: int = 0, dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        # rollout.dtype: bfloat16 (verl's default) samples in another precision than an fp32
        # actor, as vLLM does; the returned log-probs then really differ from pi_old.
        self.dtype = _torch_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, torch_dtype=self.dtype, attn_implementation="sdpa"
        ).eval()
        tok = AutoTokenizer.from_pretrained(model_path)
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.response_length = int(response_length)
        self.generator = torch.Generator().manual_seed(seed)
        self.global_steps: Optional[int] = None
        self.weight_updates = 0

    def ready(self) -> bool:
        return True

    def load_weights(self, state: dict[str, Tensor], global_steps: Optional[int] = None) -> int:
        """Load FSDP-exported full tensors (HF parameter names); returns how many were loaded."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"rpgrl_hf rollout: weights {unknown[:5]} are not parameters of the rollout model")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))
        self.global_steps = global_steps
        self.weight_updates += 1
        return len(state)

    @torch.no_grad()
    def _sample(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> tuple[list[int], list[float]]:
        """Sample up to ``max_tokens`` tokens (stop after eos); log-probs under logits / T."""
        temperature = float(sampling_params.get("temperature", 1.0) or 0.0)
        top_k = int(sampling_params.get("top_k", -1) or -1)
        top_p = float(sampling_params.get("top_p", 1.0) if sampling_params.get("top_p") is not None else 1.0)
        if top_p < 1.0:
            raise ValueError(f"rpgrl_hf rollout: top_p={top_p} is not implemented (only top_k); set rollout.top_p=1.0")
        max_new = min(int(sampling_params.get("max_tokens") or self.response_length), self.response_length)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        past, tokens, logps = None, [], []
        for _ in range(max_new):
            out = self.model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature > 0:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                logp = torch.log_softmax(logits, dim=-1)
                token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
            else:
                logp = torch.log_softmax(logits, dim=-1)
                token = int(logp.argmax())
            tokens.append(token)
            logps.append(float(logp[token]))
            if token == self.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return tokens, logps

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        **_: Any,
    ) -> TokenOutput:
        if image_data is not None or video_data is not None:
            raise ValueError("rpgrl_hf rollout serves text-only models (got image/video data)")
        tokens, logps = self._sample(list(prompt_ids), dict(sampling_params))
        return TokenOutput(
            token_ids=tokens,
            log_probs=logps if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    # Lifecycle calls verl's replica / checkpoint manager makes; nothing to free on CPU.
    async def wake_up(self) -> None: ...
    async def sleep(self) -> None: ...
    async def clear_kv_cache(self) -> None: ...
    async def release_kv_cache(self) -> None: ...
    async def resume_kv_cache(self) -> None: ...
    async def abort_all_requests(self, reject_request: bool = False) -> None: ...
    async def resume_generation(self) -> None: ...
    async def start_profile(self, **kwargs: Any) -> None: ...
    async def stop_profile(self) -> None: ...


class HFReplica(RolloutReplica):
    """verl ``RolloutReplica`` that launches one :class:`HFRolloutServer` actor."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        name = server_name(self.replica_rank, self.name_suffix)
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(_model_path(self.model_config), self.config.response_length, self.config.seed + self.replica_rank,
                    str(self.config.dtype))
        )
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name


class HFServerAdapter(BaseRollout):
    """verl ``ServerAdapter`` in the hybrid actor worker: forwards new weights to its server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        world = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.is_leader = rank % world == 0
        self._server = None

    async def resume(self, tags: list[str]) -> None: ...

    async def release(self) -> None: ...

    async def update_weights(
        self,
        weights: Generator[tuple[str, Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"rpgrl_hf rollout: wire_format={wire_format!r} is not supported (named_tensors only)")
        if kwargs.get("peft_config") is not None:
            raise ValueError("rpgrl_hf rollout: LoRA adapters are not supported; use model.lora.merge=True")
        # Every rank must drain the generator (it may run collectives to gather FSDP shards).
        state = {name: t.detach().to("cpu", copy=True) for name, t in weights}
        if not self.is_leader:
            return
        if self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        await self._server.load_weights.remote(state, global_steps)

