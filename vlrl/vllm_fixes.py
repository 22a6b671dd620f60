"""Fixes to the vLLM server that `vlrl serve` starts, loaded into each of its processes as a vLLM general
plugin (entry point `vllm.general_plugins`, `pyproject.toml`). They apply only where `vlrl serve` asked for
them (`VLRL_VLLM_FIXES=1` in the server's environment), so other vLLM servers on the machine run unchanged.

- A mixture of experts on the CPU follows a weight sync: vLLM 0.32 prepacks a MoE layer's expert weights into
  its CPU grouped-GEMM layout when a checkpoint is first loaded (`CPUUnquantizedExperts.
  process_weights_after_loading`), but an in-place reload (`reload_weights`, the disk weight sync) copies the
  new weights into the packed storage unpacked: `UnquantizedFusedMoEMethod._setup_kernel` skips the experts'
  processing on a weight update. The layer then computes with bytes in the wrong layout (the tiny MoE's
  logprobs 0.058 off after reloading its own unchanged checkpoint). The fix runs that processing on updates
  too: the reload then copies packed weights into the packed storage. GPU backends have no such step.
"""

from __future__ import annotations

import os
import sys

ENV = "VLRL_VLLM_FIXES"


def register() -> None:
    """vLLM's plugin hook (each vLLM process calls it): the fixes, where `vlrl serve` asked for them."""
    if os.environ.get(ENV) != "1":
        return
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            _cpu_moe_reload()
    except Exception as e:  # a fix that cannot install must not stop the server: it says so in its log
        print(f"vlrl: a fix to vLLM was not installed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def _cpu_moe_reload() -> None:
    try:
        from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as method
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # (another vLLM: nothing to fix, or it moved; the tests say which)
        return
    setup = method.UnquantizedFusedMoEMethod._setup_kernel
    if getattr(setup, "_vlrl", False):
        return

    def _setup_kernel(self, layer, w13, w2):
        update = self.moe_kernel is not None  # (as vLLM decides it)
        setup(self, layer, w13, w2)
        experts = getattr(self.moe_kernel, "fused_experts", None)
        if update and isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(layer)  # pad + prepack, as at the first load

    _setup_kernel._vlrl = True
    method.UnquantizedFusedMoEMethod._setup_kernel = _setup_kernel
