"""`train.offload_optimizer`: part of AdamW's state on pinned host memory between steps, so the GPU
keeps more activations and recomputes less.

AdamW keeps two moments per trainable parameter: 30.5 GiB on the 8B model in bf16, more than its
gradients (15.2) and as much as two thirds of what the activations of a 16k-token micro-batch need. The
moments are used once a step, by the optimizer step, so between steps they can live on the host. What it
costs is the copy: each way ~0.3 s for 15 GiB over PCIe, hidden behind GPU work on a stream of its own:
- to the GPU during the step's last backward pass: a parameter's moments are fetched once its gradient is
  final (its post-accumulate-grad hook, in the last pass) and the backward has freed the memory they take:
  a fetch waits (queued, in order) until the memory allocated, with it, stays within what was allocated when
  that backward began, i.e. within the activations the layers above have freed (`pace`). Fetched as soon as
  they were final, the head's moments (2.3 GiB on 8B) and the top layers' came in while every activation of
  the last micro-batch was still held, and the step's peak rose by them. The moments offloaded are those of
  the parameters whose gradients are final first (the head, then the top layers down), so their copies have
  the rest of the backward to finish in; with the layers keeping the most at the top
  (`adapters/checkpointing.py`), the memory they free comes early. Whatever is still queued when the backward
  ends is fetched before the optimizer step. The update runs its longest micro-batch last.
- back to the host after the optimizer step, overlapping what follows it (the weight sync and the next
  rollouts in training; the next update's first forward pass when updates run back to back). The next
  update's first backward waits for it on the GPU (a stream wait, not a host one).
How much is offloaded: at most the gradients' bytes (the whole state when it is smaller). That makes it
safe by construction for `auto` checkpointing: while the moments are on their way back, the next update's
first forward holds them where a later micro-batch's forward holds the gradients (allocated from the first
backward on); and the fetches in the last backward are in the probe's measured peak (the probe's pass is a
last pass, its fetches allocated like the step's, even before AdamW's first step has made the moments).
Exact: the same tensors are copied back and forth bit for bit; the step is AdamW's own (tests compare
weights and moments with an AdamW that keeps its state on the device); bit-equal on the GPU too. Measured
(8B ragged batch, README): slower when fetched at once (H200 capped at 74.5 GiB, H100); paced, with the layers
stacked, 42.8% useful MFU against 41.8% on an H100 capped at 74.5 GiB, its copies hidden.
One process or DDP: under FSDP2 each rank holds a shard of the state already (`Run` refuses it there).
`"auto"` keeps it only where the chooser recomputes less with it (`AutoCheckpointing.decide`); otherwise the
moments return to the device at the first update (`restore`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class StateOffload:
    """Offload the moments of `params`' last-finishing parameters, up to `limit` bytes, for `optimizer` (a
    torch AdamW). Calls, per update: `before_backward(i, last)` before each pass's backward, `before_step()`
    before `optimizer.step()`, `after_step()` after it; `drop()` after a failed update (an out-of-memory
    error), `settle()` before the state is read (a checkpoint), `offload_now()` after it is loaded (a
    resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], limit: int, device,
                 pace: bool = True):
        self.optimizer = optimizer
        self.pace = pace  # fetch within the memory the last backward has freed (module docstring), or at once
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.chosen: list[torch.Tensor] = []  # the parameters whose moments live on the host between steps
        total = 0
        for p in reversed(params):  # the order their gradients become final in a backward pass
            size = 2 * p.numel() * p.element_size()
            if total + size > limit:
                break
            self.chosen.append(p)
            total += size
        self.bytes = total
        self.host: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # pinned, made at the first offload
        self.fetched: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # on the GPU for this step
        self.simulated: list[torch.Tensor] = []  # before AdamW's first step: what a fetch would allocate
        self.armed = False
        self.queue: list[torch.Tensor] = []  # final, not yet fetched (in the order they became final)
        self.ceiling: int | None = None  # bytes allocated as the last backward began: fetches stay within it
        self.back: torch.cuda.Event | None = None  # the copies back to the host of the last step
        # set to a list to time the compute stream's waits for the copies: (what, start event, end event) each
        self.waits: list | None = None
        # bytes allocated on the device now (None: not measured, fetches not paced); tests stand in for it
        self.allocated = (lambda: torch.cuda.memory_allocated(self.device)) if self.cuda else None
        # every parameter's hook: fetches still queued go on as the layers below the chosen ones finish
        self.is_chosen = set(self.chosen)
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def describe(self) -> str:
        gib, n = self.bytes / 2**30, len(self.chosen)
        return f"optimizer state: {gib:.1f} GiB of AdamW's moments ({n} tensors) on the host between steps"

    # --- an update's passes --------------------------------------------------------------------------------

    def before_backward(self, index: int, last: bool) -> None:
        if index == 0 and self.back is not None and self.cuda:
            with self._timed("back to the host"):  # the moments' memory is free again after it
                torch.cuda.current_stream(self.device).wait_event(self.back)
            self.back = None
        self.armed = last
        self.queue = []
        paced = last and self.pace and self.allocated is not None
        self.ceiling = self.allocated() if paced else None

    def _ready(self, p: torch.Tensor) -> None:
        """A parameter's gradient is final (last pass): a chosen one's moments queued; the queue fetched in
        order as far as the memory the backward has freed allows."""
        if not self.armed:
            return
        if p in self.is_chosen and p not in self.fetched:
            self.queue.append(p)
        while self.queue:
            p = self.queue[0]
            size = 2 * p.numel() * p.element_size()
            if self.ceiling is not None and self.allocated() + size > self.ceiling:
                return  # (the next hook tries again, with what the backward has freed by then)
            self.queue.pop(0)
            if not self.optimizer.state.get(p):  # before AdamW's first step: allocate what a fetch would
                self.simulated += [torch.empty_like(p) for _ in MOMENTS]
            elif p in self.host:
                self._fetch(p)

    def _fetch(self, p: torch.Tensor) -> None:
        host = self.host[p]
        dev = {k: torch.empty_like(host[k], device=self.device) for k in MOMENTS}  # on the compute stream
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for k in MOMENTS:
                    dev[k].copy_(host[k], non_blocking=True)
                    dev[k].record_stream(self.stream)  # dropped early (an OOM), not reused mid-copy
        else:
            for k in MOMENTS:
                dev[k].copy_(host[k])
        self.fetched[p] = dev

    def before_step(self) -> None:
        """Every offloaded moment on the GPU (those still queued, or whose hook did not fire, fetched now) for
        AdamW's step."""
        self.armed = False
        self.queue = []
        self.simulated.clear()
        for p in self.chosen:
            if p in self.host and p not in self.fetched and self.optimizer.state.get(p):
                self._fetch(p)
        if self.cuda:
            with self._timed("to the GPU"):
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for p, dev in self.fetched.items():
            self.optimizer.state[p].update(dev)

    def after_step(self) -> None:
        """The moments back to the host on the copy stream; their GPU memory is reused once the copies end."""
        self.fetched.clear()
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for p in self.chosen:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            if p not in self.host:  # the first step made them
                self.host[p] = {k: torch.empty(state[k].shape, dtype=state[k].dtype, device="cpu",
                                               pin_memory=self.cuda) for k in MOMENTS}
            host = self.host[p]
            for k in MOMENTS:
                dev = state[k]
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        host[k].copy_(dev, non_blocking=True)
                    dev.record_stream(self.stream)
                else:
                    host[k].copy_(dev)
                state[k] = host[k]
        if self.cuda:
            self.back = self.stream.record_event()

    @contextmanager
    def _timed(self, what: str):
        """With `waits` set: events on the compute stream either side of a wait for the copy stream (their
        elapsed time is how long the GPU waited for the copies)."""
        if self.waits is None:
            yield
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.waits.append((what, start, end))

    def drop(self) -> None:
        """After a failed update: the moments fetched for it are dropped (the host copies are unchanged)."""
        self.armed = False
        self.queue = []
        self.simulated.clear()
        self.fetched.clear()

    def settle(self) -> None:
        """Wait until the last step's moments are on the host (before the optimizer's state is read)."""
        if self.back is not None:
            self.back.synchronize()

    def offload_now(self) -> None:
        """After the optimizer's state was loaded onto the GPU (a resume): the chosen moments to the host."""
        self.after_step()
        self.settle()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def restore(self) -> None:
        """Stop offloading: every moment back on the device for good (`offload_optimizer = "auto"` when the
        chooser finds the offload buys nothing), the hooks removed."""
        self.settle()
        self.drop()
        for p, host in self.host.items():
            state = self.optimizer.state.get(p)
            if state:
                for k in MOMENTS:
                    state[k] = host[k].to(self.device, copy=True)  # (the pinned buffers go)
        self.host.clear()
        self.close()
