"""`vlrl train` under FSDP2 on CPU processes, for tests/test_distributed.py; run under torchrun (gloo).

Accelerate runs FSDP on GPUs only. Here every Accelerator is switched to FSDP2 right after it is created, with
the plugin the fsdp2-*.yaml configs describe, so `vlrl train`'s FSDP path (the sharded update, the in-process
sampler's replica, gathered checkpoints, a resume that re-shards the optimizer state) runs as it does on GPUs.
"""

import sys

from accelerate import Accelerator
from accelerate.utils import DistributedType

from vlrl.adapters.qwen3_vl import FSDP_UNITS
from vlrl.cli import app
from vlrl.fsdp import fsdp2_plugin
from vlrl.train import Run

_init = Accelerator.__init__


def fsdp_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = fsdp2_plugin(FSDP_UNITS)


def checked_run_init(self, *args, **kwargs):
    _run_init(self, *args, **kwargs)
    from torch.distributed.fsdp import FSDPModule

    assert self.fsdp and isinstance(self.policy, FSDPModule), "the policy was not sharded"
    assert self.replica is not None or self.cfg.rollout.server_url


Accelerator.__init__ = fsdp_init
_run_init = Run.__init__
Run.__init__ = checked_run_init

if __name__ == "__main__":
    app(sys.argv[1:])
