"""How the learner's weights reach the sampler after each optimizer step: one strategy, chosen once at start.

- `NoSync`: the in-process sampler samples with the training model itself (one process, or DDP: every rank
  holds the whole model), so there is nothing to send.
- `ReplicaRefresh`: FSDP2 with the in-process sampler. No rank holds the whole policy, so each rank samples
  with an unsharded replica, refreshed from the shards (every rank takes part in the all-gathers).
- `ServerSync`: a vLLM server. The main process pushes the weights; under FSDP2 every rank first takes part
  in gathering them to rank 0's CPU (cast to the model's dtype: FSDP keeps float32 master weights). The other
  ranks wait, so no rank samples from a server that is mid-swap. Then every rank learns the version tag of the
  weights pushed (each rank's sampler checks it before and after sampling) or the push's error (every rank
  raises it, so all stop together). With one process, the disk sync's push returns once the weights are in
  host buffers; its files and the server's reload run beside the learner's next work (the next sampling waits
  for them). With several, the push is waited for (every rank must learn its version).

`times(seconds)`: the step's sync metrics from the seconds the learner spent in the call: `sync_blocking`
(those seconds) and `sync` (a whole push, of the last one that finished: copy, files, reload, version check).
"""

from __future__ import annotations

import torch

from .fsdp import copy_full_weights, full_state
from .rollout.vllm_client import ServerError


class NoSync:
    def __call__(self, policy, version: int | None = None) -> None:
        return None

    def times(self, seconds: float) -> dict[str, float]:
        return {"sync": seconds, "sync_blocking": seconds}

    def close(self) -> None:
        return None


class ReplicaRefresh(NoSync):
    def __init__(self, replica):
        self.replica = replica

    def __call__(self, policy, version: int | None = None) -> None:
        copy_full_weights(policy, self.replica)


class ServerSync(NoSync):
    def __init__(self, sampler, accelerator, fsdp: bool, dtype: torch.dtype):
        self.sampler, self.accelerator, self.fsdp, self.dtype = sampler, accelerator, fsdp, dtype

    def __call__(self, policy, version: int | None = None) -> None:
        """`version`: the learner's step count of these weights, which the rollouts sampled from them record."""
        acc = self.accelerator
        model = acc.unwrap_model(policy).model  # the HF model inside the policy wrapper
        weights = None
        if self.fsdp:
            weights = {k: v.to(self.dtype) if v.is_floating_point() else v
                       for k, v in full_state(policy).items()}
        error = None
        if acc.is_main_process:
            try:
                self.sampler.sync_weights(model, weights, background=acc.num_processes == 1, version=version)
            except ServerError as e:
                error = str(e)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = broadcast_object_list([self.sampler.weights_version, self.sampler.served_version, error])
            self.sampler.weights_version, self.sampler.served_version, error = shared
            self.sampler.pushing_version = self.sampler.served_version
        else:
            acc.wait_for_everyone()
        if error is not None:
            raise ServerError(error)

    def times(self, seconds: float) -> dict[str, float]:
        return {"sync": self.sampler.push_s or seconds, "sync_blocking": seconds}

    def close(self) -> str | None:
        """The last push waited for (its failure returned, in words), the sync's buffers freed."""
        try:
            self.sampler.close()
        except ServerError as e:
            return f"the last weight push to the vLLM server failed: {e}"
        return None


def choose_sync(server: bool, fsdp: bool, sampler, accelerator, replica, dtype: torch.dtype):
    """The strategy for this run (see the module docstring)."""
    if server:
        return ServerSync(sampler, accelerator, fsdp, dtype)
    if fsdp:
        return ReplicaRefresh(replica)
    return NoSync()
