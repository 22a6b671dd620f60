"""Counting the ops that read a tensor's value on the host (the tests of host waits)."""

import torch


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (on a GPU, each waits for the GPU)."""

    READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero.default", "aten.masked_select",
             "aten.unique", "aten._unique2", "aten.repeat_interleave.Tensor")

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = (str(func).startswith(("aten.index.", "aten.index_put")) and len(args) > 1
                         and any(getattr(t, "dtype", None) == torch.bool for t in args[1] or ()))
        if boolean_index or any(str(func).startswith(name) for name in self.READS):  # (a mask's nonzero)
            self.reads += 1
        return func(*args, **(kwargs or {}))
