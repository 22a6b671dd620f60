"""How the learner's weights reach the sampler after each optimizer step: one strategy, chosen once at start.

- `NoSync`: the in-process sampler samples with the training model itself (one process, or DDP: every rank
  holds the whole model), so there is nothing to send.
- `ReplicaRefresh`: FSDP2 with the in-process sampler. No rank holds the whole policy, so each rank samples
  with an unsharded replica, refreshed from the shards (every rank takes part in the all-gathers).
- `ServerSync`: a vLLM server. The main process pushes the weights; under FSDP2 every rank first takes part
  in gathering them to rank 0's CPU (cast to the model's dtype: FSDP keeps float32 master weights). The other
  ranks wait, so no rank samples from a server that is mid-swap. Then every rank learns the version tag of the
  weights pushed (each rank's sampler checks it before and after sampling) or the push's error (every rank
  raises it, so all stop together).
"""

from __future__ import annotations

import torch

from .fsdp import copy_full_weights, full_state
from .rollout.vllm_client import ServerError


class NoSync:
    def __call__(self, policy) -> None:
        return None


class ReplicaRefresh:
    def __init__(self, replica):
        self.replica = replica

    def __call__(self, policy) -> None:
        copy_full_weights(policy, self.replica)


class ServerSync:
    def __init__(self, sampler, accelerator, fsdp: bool, dtype: torch.dtype):
        self.sampler, self.accelerator, self.fsdp, self.dtype = sampler, accelerator, fsdp, dtype

    def __call__(self, policy) -> None:
        acc = self.accelerator
        model = acc.unwrap_model(policy).model  # the HF model inside the policy wrapper
        weights = None
        if self.fsdp:
            weights = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in full_state(policy).items()}
        error = None
        if acc.is_main_process:
            try:
                self.sampler.sync_weights(model, weights)
            except ServerError as e:
                error = str(e)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = broadcast_object_list([self.sampler.weights_version, error])
            self.sampler.weights_version, error = shared
        else:
            acc.wait_for_everyone()
        if error is not None:
            raise ServerError(error)


def choose_sync(server: bool, fsdp: bool, sampler, accelerator, replica, dtype: torch.dtype):
    """The strategy for this run (see the module docstring)."""
    if server:
        return ServerSync(sampler, accelerator, fsdp, dtype)
    if fsdp:
        return ReplicaRefresh(replica)
    return NoSync()
